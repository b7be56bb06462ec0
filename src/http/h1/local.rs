//! Answers the relay gives itself: a local decision (its request body
//! read and dropped), or the end of a connection that failed.

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite};

use super::*;

impl<S: Side> Relay<'_, S> {
    /// Answers a request locally; its body, if any, is read and dropped
    /// (or the connection closes, when the client waits for a 100 first).
    pub(super) async fn answer<C>(
        &mut self,
        client: &mut C,
        mut x: Exchange,
        head: &RequestHead,
        local: Local,
        close: bool,
    ) -> Result<bool, Fail>
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let close = close || (head.framing != Framing::Empty && head.expect_continue);
        if !close && head.framing != Framing::Empty {
            let mut rest = Remaining::of(head.framing);
            let mut sink = tokio::io::sink();
            self.out.clear();
            pipe(
                client,
                &mut self.cbuf,
                &mut sink,
                &mut self.out,
                &mut rest,
                &mut self.idle,
            )
            .await
            .map_err(request_pipe_fail)?;
        }
        x.decided_in(&mut self.series, local.status, local.decision, local.reason);
        self.out.clear();
        local.write_h1(close, &mut self.out);
        let n = self.out.len() as u64;
        write_flush(client, &self.out).await.map_err(Fail::Client)?;
        self.done.bytes_out += n;
        self.done.requests += 1;
        x.ended(0, n);
        Ok(!close)
    }

    /// Ends the connection for `fail`, answering first where HTTP allows.
    pub(super) async fn fail<C>(&mut self, client: &mut C, fail: Fail)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // The label the connection's outcome carries: none for a malformed
        // request (answered 400, the client's fault, not the connection's).
        let (label, detail, local) = match fail {
            Fail::Client(e) => (Some("client_io"), e.to_string(), None),
            Fail::Idle => (Some("idle_timeout"), "idle".to_owned(), None),
            Fail::HeaderTimeout | Fail::BodyTimeout => {
                let reason = if matches!(fail, Fail::HeaderTimeout) {
                    "header_timeout"
                } else {
                    "body_timeout"
                };
                self.side.layer().metrics.refusal(S::DIRECTION, reason);
                let local = Local::error(StatusCode::REQUEST_TIMEOUT, reason, "request timeout\n");
                (Some(reason), reason.to_owned(), Some(local))
            }
            Fail::UpstreamLate(d) => (Some("upstream_io"), d, None),
            Fail::BadRequest(e) => {
                let (status, reason) = match e {
                    HeadError::TooLarge => (
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "head_too_large",
                    ),
                    HeadError::UnsupportedCoding => {
                        (StatusCode::NOT_IMPLEMENTED, "transfer_coding")
                    }
                    _ => (StatusCode::BAD_REQUEST, "malformed_head"),
                };
                self.side.layer().metrics.refusal(S::DIRECTION, reason);
                let local = Local::error(status, "bad_request", "malformed HTTP request\n");
                (None, e.to_string(), Some(local))
            }
            Fail::BadBody(e) => {
                let local = Local::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "malformed HTTP request body\n",
                );
                (None, e.to_string(), Some(local))
            }
            Fail::Upstream(d) => (Some("upstream"), d, Some(self.side.unavailable())),
        };
        if let Some(local) = local {
            tracing::debug!(reason = local.reason, detail = %detail, "http/1: answering and closing");
            let mut x = self.side.exchange();
            x.decided(local.status, local.decision, local.reason);
            self.out.clear();
            local.write_h1(true, &mut self.out);
            if write_flush(client, &self.out).await.is_ok() {
                self.done.bytes_out += self.out.len() as u64;
            }
            x.ended(0, self.out.len() as u64);
        }
        self.done.error = label.map(|label| Box::new((label, detail)));
    }
}
