//! HTTP/2 flow control for every HTTP/2 connection the sidecar serves or
//! makes (the mesh pool both ends, app-facing servers, the inbound app
//! client), in one place because the two ends of a connection must agree.
//!
//! Why fixed, large windows and no adaptive window: hyper's adaptive window
//! starts at 64 KiB and sets the connection window to one stream's window.
//! A mesh connection carries up to 256 streams, so the connection window
//! became the bottleneck: each `WINDOW_UPDATE` (half a window, 32 KiB) was
//! shared by the streams waiting to send, which went out as DATA frames of
//! a few hundred bytes. h2 (0.4.16 on) charges every DATA frame under 256
//! bytes against a budget of half the connection window and closes the
//! connection with `GOAWAY ENHANCE_YOUR_CALM` ("too_many_data_frames") when
//! the frames wait unread: legitimate bursts tripped it and failed every
//! request on the shared connection. With the windows below, updates come
//! in large steps (so frames are full-sized, 16 KiB) and the budget is
//! megabytes.
//!
//! The connection window is the stream limit times the stream window:
//! streams that wait (for an app connection, for a mesh stream) hold the
//! body data they were sent unread, and if that could fill the connection
//! window, the streams being served could never get the rest of their
//! bodies (the old 64 KiB window stalled h2load's 16 KiB uploads for good).
//! Windows are credit, not memory: a connection holds buffered data only
//! while its reader is slower than its writer, at most the connection
//! window.

/// Each stream's receive window: 128 KiB (a single large body runs at
/// 128 KiB per round trip: 640 MB/s at 0.2 ms), updated in 64 KiB steps,
/// so DATA frames go out full-sized.
pub(crate) const STREAM_WINDOW: u32 = 128 << 10;

/// The streams a client may open on a connection we serve (said here
/// because the connection window depends on it): 256, so that a peer
/// sidecar's pooled connection carries 240 tunnels (opaque app
/// connections) and still has streams for HTTP requests.
pub(crate) const MAX_STREAMS: u32 = 256;

/// Every connection's receive window: all streams at full window fit
/// (32 MiB), and h2's small-frame budget, half of it, is 16 MiB.
pub(crate) const CONNECTION_WINDOW: u32 = MAX_STREAMS * STREAM_WINDOW;

/// The streams a peer sidecar may open on a tunnels-only connection:
/// 1,024. Every mesh connection holds about 100 KiB of codec and TLS
/// buffers whether its tunnels are busy or idle; at 256 streams that was
/// 400 bytes more per idle app connection, on each side (10,000 idle app
/// connections rode 42 connections; docs/BENCHMARKS.md).
pub(crate) const TUNNEL_STREAMS: u32 = 1024;

/// A tunnels-only connection's receive window, for the same reason as
/// [`CONNECTION_WINDOW`]: 128 MiB of credit (not memory), and h2's
/// small-frame budget 64 MiB.
const TUNNEL_CONNECTION_WINDOW: u32 = TUNNEL_STREAMS * STREAM_WINDOW;

/// Streams a peer sidecar may reset before we accept them, and streams we
/// remember as reset: an app connection that goes away cancels all its
/// streams at once, which on a shared mesh connection is normal, not the
/// "rapid reset" attack h2's default of 20 guards against.
pub(crate) const MESH_RESETS: usize = 1024;

/// Streams a connection may reset locally for its own errors before it is
/// closed (hyper's default, which the hyper-served connections have).
const LOCAL_ERROR_RESETS: usize = 1024;
/// What h2 buffers per stream before it stops taking more (hyper's
/// default, which the hyper-served connections have).
const SEND_BUFFER: usize = 400 << 10;
/// The largest header list the client side accepts (hyper's default).
const CLIENT_HEADER_LIST: u32 = 16 << 10;

/// The client of a tunnels-only mesh connection, on h2 directly
/// (`super::h2_stream`): the settings hyper's mesh client has.
pub(crate) fn tunnel_client() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(TUNNEL_CONNECTION_WINDOW)
        .max_concurrent_reset_streams(MESH_RESETS)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS))
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(CLIENT_HEADER_LIST)
        .enable_push(false);
    builder
}

/// The server of a tunnels-only mesh connection, on h2 directly: the
/// settings `super::server_builder` gives a peer sidecar's connection;
/// `header_list`: the head size limit.
pub(crate) fn tunnel_server(header_list: u32) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(TUNNEL_CONNECTION_WINDOW)
        .max_concurrent_streams(TUNNEL_STREAMS)
        .max_pending_accept_reset_streams(MESH_RESETS)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS))
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(header_list);
    builder
}
