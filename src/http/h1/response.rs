//! The upstream half of an exchange: redial, `Expect: 100-continue`, the
//! response head, upgrades; and the head rewrites each hop makes.

use crate::net::idle::OwnTimer;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};

use super::*;

impl<S: Side> Relay<'_, S> {
    pub(super) async fn redial(&mut self) -> Result<S::Upstream, Fail> {
        self.ubuf.consume(usize::MAX);
        self.side
            .dial()
            .await
            .map_err(|e| Fail::Upstream(e.to_string()))
    }

    /// `Expect: 100-continue`: the head goes alone; the body follows once
    /// the upstream says 100 or the client sends it anyway. A final answer
    /// first means the body is never sent (the connection then closes).
    pub(super) async fn send_expecting<C, U>(
        &mut self,
        client: &mut C,
        up: &mut U,
        head: &mut RequestHead,
        body_unsent: &mut bool,
    ) -> Result<u64, PipeError>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
        U: AsyncRead + AsyncWrite + Unpin + Send,
    {
        write_flush(up, &self.out).await.map_err(PipeError::Write)?;
        self.out.clear();
        while self.cbuf.is_empty() {
            match message::parse_response(self.ubuf.bytes(), &head.parts.method) {
                Ok(Some((resp, len))) if resp.parts.status.is_informational() => {
                    let mut resp = resp;
                    take_head(&mut self.ubuf, &mut self.out, &resp, len);
                    finish_interim(&mut resp, &mut self.out);
                    write_flush(client, &self.out)
                        .await
                        .map_err(PipeError::Write)?;
                    self.out.clear();
                    if resp.parts.status == StatusCode::CONTINUE {
                        break;
                    }
                    continue;
                }
                // A final answer: left for the response phase.
                Ok(Some(_)) | Err(_) => {
                    *body_unsent = true;
                    return Ok(0);
                }
                Ok(None) => {}
            }
            let (cbuf, ubuf) = (&mut self.cbuf, &mut self.ubuf);
            let either = async {
                tokio::select! {
                    read = cbuf.fill(client) => (true, read),
                    read = ubuf.fill(up) => (false, read),
                }
            };
            match self.idle.guard(either).await {
                None => return Err(PipeError::Idle),
                Some((true, Ok(0))) => return Err(PipeError::Eof),
                Some((true, Err(e))) => return Err(PipeError::Read(e)),
                // The response phase reports the upstream's failure.
                Some((false, Ok(0) | Err(_))) => {
                    *body_unsent = true;
                    return Ok(0);
                }
                Some((_, Ok(_))) => {}
            }
        }
        let mut rest = Remaining::of(head.framing);
        pipe(
            client,
            &mut self.cbuf,
            up,
            &mut self.out,
            &mut rest,
            &mut self.idle,
        )
        .await
    }

    /// Reads the response head, relaying interim (1xx) responses; `None`
    /// for a protocol switch, its head written into `out` for the tunnel.
    pub(super) async fn response_head<C, U>(
        &mut self,
        client: &mut C,
        up: &mut U,
        method: &Method,
        head: &RequestHead,
    ) -> Result<Option<ResponseHead>, Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
        U: AsyncRead + AsyncWrite + Unpin + Send,
    {
        loop {
            let (mut resp, len) = loop {
                match message::parse_response(self.ubuf.bytes(), method) {
                    Ok(Some(found)) => break found,
                    Ok(None) => {}
                    Err(e) => return Err(Fail::Upstream(format!("bad response: {e}"))),
                }
                match self.idle.guard(self.ubuf.fill(up)).await {
                    None => return Err(Fail::Idle),
                    Some(Ok(0)) => return Err(Fail::Upstream("closed before answering".into())),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(Fail::Upstream(e.to_string())),
                }
            };
            take_head(&mut self.ubuf, &mut self.out, &resp, len);
            let status = resp.parts.status;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                let Some(protocol) = &head.upgrade else {
                    return Err(Fail::Upstream("101 without an upgrade request".into()));
                };
                strip_hop_by_hop(&mut resp.parts.headers);
                let headers = &mut resp.parts.headers;
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, protocol.clone());
                self.out.clear();
                message::write_response(&resp.parts, &mut self.out);
                return Ok(None);
            }
            if !status.is_informational() {
                return Ok(Some(resp));
            }
            finish_interim(&mut resp, &mut self.out);
            write_flush(client, &self.out).await.map_err(Fail::Client)?;
        }
    }

    /// After `101 Switching Protocols` (its head in `out`): bytes both ways
    /// until both sides close.
    pub(super) async fn tunnel<C, U>(&mut self, client: &mut C, up: &mut U) -> Result<(), Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
        U: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.out.extend_from_slice(self.ubuf.bytes());
        self.ubuf.consume(usize::MAX);
        write_flush(client, &self.out).await.map_err(Fail::Client)?;
        write_flush(up, self.cbuf.bytes())
            .await
            .map_err(|e| Fail::UpstreamLate(e.to_string()))?;
        self.cbuf.consume(usize::MAX);
        let counters = crate::net::forward::ByteCounters::default();
        let done =
            crate::net::forward::forward(client, up, OwnTimer::new(self.idle_period), &counters)
                .await;
        self.done.bytes_in += done.a_to_b;
        self.done.bytes_out += done.b_to_a;
        self.done.requests += 1;
        Ok(())
    }
}

/// Puts back the framing and connection headers hop-by-hop stripping
/// removed, as this hop relays them: chunked bodies pass through as they
/// are, a head rewritten from its fields says the length its body is
/// relayed by (whatever a field said), an upgrade request keeps asking,
/// HTTP/1.0 keep-alive stays asked, and the client's `close` is passed on
/// when `passes_close`.
pub(super) fn restore_framing(head: &mut RequestHead, passes_close: bool) {
    let headers = &mut head.parts.headers;
    match head.framing {
        Framing::Chunked => {
            headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        // One number, whatever list or copies came (the parser took them
        // as this length; such a head is never spliced); a spliced head
        // keeps its own: one more would be a second.
        Framing::Length(n) if head.fields => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::Empty if head.fields && headers.contains_key(header::CONTENT_LENGTH) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        _ => {}
    }
    if let Some(protocol) = &head.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    } else if !head.keep_alive && passes_close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if head.parts.version == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
}

/// Takes a parsed response head off `ubuf`; a clean one is copied into
/// `out` as it came, but for its last CRLF (headers may follow).
pub(super) fn take_head(ubuf: &mut Buf, out: &mut Vec<u8>, resp: &ResponseHead, len: usize) {
    out.clear();
    if resp.clean {
        out.extend_from_slice(&ubuf.bytes()[..len - 2]);
    }
    ubuf.consume(len);
}

/// Completes an interim (1xx) head in `out` (see [`take_head`]).
pub(super) fn finish_interim(resp: &mut ResponseHead, out: &mut Vec<u8>) {
    if resp.clean {
        out.extend_from_slice(b"\r\n");
    } else {
        strip_hop_by_hop(&mut resp.parts.headers);
        out.clear();
        message::write_response(&resp.parts, out);
    }
}

pub(super) fn finish_response_head(resp: &mut ResponseHead, close: bool, client_version: Version) {
    let headers = &mut resp.parts.headers;
    // The body is relayed as it came, chunks and any coding before
    // `chunked` (`gzip, chunked`) included: so are its codings, whatever
    // else goes as hop-by-hop. (Restored as `chunked` alone, gzip bytes
    // reached the client as the body.) Without codings, no allocation.
    let codings: Vec<HeaderValue> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .cloned()
        .collect();
    strip_hop_by_hop(headers);
    for coding in codings {
        headers.append(header::TRANSFER_ENCODING, coding);
    }
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if client_version == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
}
