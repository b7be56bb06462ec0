//! Bodies relayed from one side's buffer to the other side, and the
//! failures of doing so.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::*;

/// What a message body relay failed on.
pub(super) enum PipeError {
    Read(io::Error),
    Write(io::Error),
    Eof,
    Framing(BodyError),
    Idle,
}

/// Relays a body from `src` (its first bytes in `sbuf`) to `dst`, after
/// whatever `out` holds (a head): gathered into one write while small.
/// Returns the body bytes relayed.
pub(super) async fn pipe<R, W>(
    src: &mut R,
    sbuf: &mut Buf,
    dst: &mut W,
    out: &mut Vec<u8>,
    rest: &mut Remaining,
    idle: &mut Idle,
) -> Result<u64, PipeError>
where
    R: AsyncRead + Unpin + Send + ?Sized,
    W: AsyncWrite + Unpin + Send + ?Sized,
{
    let mut moved = 0u64;
    loop {
        let take = rest.take(sbuf.bytes()).map_err(PipeError::Framing)?;
        if take > 0 {
            let bytes = &sbuf.bytes()[..take];
            if out.len() + take <= COALESCE {
                out.extend_from_slice(bytes);
            } else {
                drain_out(dst, out).await?;
                dst.write_all(bytes).await.map_err(PipeError::Write)?;
            }
            sbuf.consume(take);
            moved += take as u64;
        }
        drain_out(dst, out).await?;
        dst.flush().await.map_err(PipeError::Write)?;
        if rest.is_done() {
            return Ok(moved);
        }
        match idle.guard(sbuf.fill(src)).await {
            None => return Err(PipeError::Idle),
            Some(Ok(0)) if matches!(rest, Remaining::UntilClose) => *rest = Remaining::Done,
            Some(Ok(0)) => return Err(PipeError::Eof),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(PipeError::Read(e)),
        }
    }
}

pub(super) async fn drain_out<W: AsyncWrite + Unpin + ?Sized>(
    dst: &mut W,
    out: &mut Vec<u8>,
) -> Result<(), PipeError> {
    if !out.is_empty() {
        dst.write_all(out).await.map_err(PipeError::Write)?;
        out.clear();
    }
    Ok(())
}

pub(super) async fn write_flush<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    bytes: &[u8],
) -> io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// A request body relay's failure: the client's fault unless writing to
/// the upstream failed.
pub(super) fn request_pipe_fail(e: PipeError) -> Fail {
    match e {
        PipeError::Read(e) => Fail::Client(e),
        PipeError::Eof => Fail::Client(io::ErrorKind::UnexpectedEof.into()),
        PipeError::Framing(e) => Fail::BadBody(e),
        PipeError::Idle => Fail::BodyTimeout,
        PipeError::Write(e) => Fail::Upstream(e.to_string()),
    }
}

pub(super) fn pipe_detail(e: PipeError) -> String {
    match e {
        PipeError::Read(e) | PipeError::Write(e) => e.to_string(),
        PipeError::Eof => "closed mid-body".into(),
        PipeError::Framing(e) => e.to_string(),
        PipeError::Idle => "idle".into(),
    }
}
