use super::*;

/// One frame: its 9-byte header and `len` payload bytes.
fn frame(kind: u8, flags: u8, stream: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend((0..len).map(|i| i as u8));
    f
}

const SETTINGS: u8 = 0x4;
const DATA: u8 = 0x0;
const PING: u8 = 0x6;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A client's opening: the preface and an empty SETTINGS.
fn opening() -> Vec<u8> {
    let mut wire = H2_PREFACE.to_vec();
    wire.extend(frame(SETTINGS, 0, 0, 0));
    wire
}

/// What is open after each byte, fed one byte at a time.
fn byte_by_byte(wire: &[u8]) -> (Vec<Option<Open>>, FrameTracker) {
    let mut t = FrameTracker::default();
    let open = wire.iter().map(|b| t.feed(&[*b]).open).collect();
    (open, t)
}

#[test]
fn an_opening_is_open_until_the_first_frame_is_complete() {
    let wire = opening();
    let (open, end) = byte_by_byte(&wire);
    assert!(open[..wire.len() - 1]
        .iter()
        .all(|o| *o == Some(Open::Preface)));
    assert_eq!(open[wire.len() - 1], None);
    assert_eq!(end.open(), None);
    assert_eq!(
        FrameTracker::default().open(),
        None,
        "no byte yet: no clock"
    );
}

#[test]
fn a_header_block_stays_open_across_continuation_frames() {
    let mut wire = opening();
    let start = wire.len();
    wire.extend(frame(HEADERS, 0, 1, 20));
    let first_end = wire.len();
    wire.extend(frame(CONTINUATION, 0, 1, 7));
    wire.extend(frame(CONTINUATION, 0, 1, 0));
    wire.extend(frame(CONTINUATION, END_HEADERS, 1, 5));
    let (open, end) = byte_by_byte(&wire);
    // A frame, until its type byte (the fourth) says which.
    assert!(open[start..start + 3]
        .iter()
        .all(|o| *o == Some(Open::Frame)));
    assert!(open[start + 3..wire.len() - 1]
        .iter()
        .all(|o| *o == Some(Open::HeaderBlock)));
    assert_eq!(
        open[first_end - 1],
        Some(Open::HeaderBlock),
        "block goes on"
    );
    assert_eq!(open[wire.len() - 1], None);
    assert_eq!(end.open(), None);
}

#[test]
fn other_frames_are_open_from_their_first_byte_to_their_last() {
    let mut wire = opening();
    let start = wire.len();
    wire.extend(frame(DATA, 0, 1, 300));
    let (open, _) = byte_by_byte(&wire);
    assert!(open[start..wire.len() - 1]
        .iter()
        .all(|o| *o == Some(Open::Frame)));
    assert_eq!(open[wire.len() - 1], None);
}

#[test]
fn padded_and_priority_flags_do_not_move_a_boundary() {
    let mut plain = opening();
    plain.extend(frame(HEADERS, END_HEADERS, 1, 40));
    let mut flagged = opening();
    flagged.extend(frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 1, 40));
    let (a, _) = byte_by_byte(&plain);
    let (b, _) = byte_by_byte(&flagged);
    assert_eq!(a, b);
    assert_eq!(b.last(), Some(&None));
}

/// A stream with every kind of span, split in two at every byte: the
/// tracker ends where one feed of the whole ends, and is open after the
/// first part exactly as when fed byte by byte.
#[test]
fn a_split_at_any_byte_tracks_as_the_whole() {
    let mut wire = opening();
    wire.extend(frame(HEADERS, PADDED, 1, 12));
    wire.extend(frame(CONTINUATION, END_HEADERS, 1, 3));
    wire.extend(frame(DATA, 0, 1, 17));
    wire.extend(frame(PING, 0, 0, 8));
    wire.extend(frame(HEADERS, END_HEADERS | PRIORITY, 3, 0));
    wire.extend(frame(DATA, 0x1, 3, 2));
    let (open, end) = byte_by_byte(&wire);
    let mut whole = FrameTracker::default();
    assert_eq!(
        whole.feed(&wire),
        Fed {
            open: None,
            started: true
        }
    );
    assert_eq!(whole, end);
    for at in 1..wire.len() {
        let mut t = FrameTracker::default();
        let first = t.feed(&wire[..at]);
        assert_eq!(first.open, open[at - 1], "split at {at}");
        assert!(first.started);
        let second = t.feed(&wire[at..]);
        assert_eq!(second.open, None, "split at {at}");
        assert_eq!(t, end, "split at {at}");
    }
}

#[test]
fn started_says_whether_the_open_span_began_in_these_bytes() {
    let mut t = FrameTracker::default();
    t.feed(&opening());
    let data = frame(DATA, 0, 1, 10);
    let ping = frame(PING, 0, 0, 8);
    assert_eq!(
        t.feed(&data[..4]),
        Fed {
            open: Some(Open::Frame),
            started: true
        }
    );
    // The same frame goes on: its clock runs from its first byte.
    assert_eq!(
        t.feed(&data[4..12]),
        Fed {
            open: Some(Open::Frame),
            started: false
        }
    );
    // It ends, and the next begins within the same bytes.
    let mut rest = data[12..].to_vec();
    rest.extend_from_slice(&ping[..3]);
    assert_eq!(
        t.feed(&rest),
        Fed {
            open: Some(Open::Frame),
            started: true
        }
    );
    let headers = frame(HEADERS, 0, 1, 2);
    let mut rest = ping[3..].to_vec();
    rest.extend_from_slice(&headers);
    assert_eq!(
        t.feed(&rest),
        Fed {
            open: Some(Open::HeaderBlock),
            started: true
        }
    );
    // A CONTINUATION goes on with the block's clock.
    assert_eq!(
        t.feed(&frame(CONTINUATION, 0, 1, 2)),
        Fed {
            open: Some(Open::HeaderBlock),
            started: false
        }
    );
}

#[test]
fn a_length_over_any_limit_is_counted_and_left_to_h2() {
    let mut t = FrameTracker::default();
    t.feed(&opening());
    let mut head = frame(DATA, 0, 1, 0);
    head[..3].copy_from_slice(&[0xff, 0xff, 0xff]);
    assert_eq!(t.feed(&head).open, Some(Open::Frame));
    assert_eq!(t.payload_left, 0xff_ffff);
}

#[test]
fn bytes_that_are_not_a_preface_are_not_tracked() {
    let mut t = FrameTracker::default();
    let fed = t.feed(b"GET / HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(fed.open, None);
    assert_eq!(t.feed(&frame(HEADERS, 0, 1, 3)).open, None);
    // A preface that goes wrong part way, split.
    let mut t = FrameTracker::default();
    assert_eq!(t.feed(&H2_PREFACE[..10]).open, Some(Open::Preface));
    assert_eq!(t.feed(b"XXXX").open, None);
}

#[test]
fn the_tracker_is_a_few_bytes() {
    assert!(std::mem::size_of::<FrameTracker>() <= 16);
}
