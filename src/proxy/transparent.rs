//! Transparent interception: the destination a redirected connection was
//! meant for, read with `SO_ORIGINAL_DST` after `stepmesh init`'s iptables
//! REDIRECT sent it to 15006 (inbound) or 15001 (outbound).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The original destination of a REDIRECTed connection. Fails (ENOENT) for
/// a connection that was not redirected, e.g. one dialled straight at 15001.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv6() {
        sock.original_dst_v6()?
    } else {
        sock.original_dst_v4()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an IP socket address"))
}
