//! Transparent interception: the destination a redirected connection was
//! meant for, read with `SO_ORIGINAL_DST` after `stepmesh init`'s iptables
//! REDIRECT sent it to 15006 (inbound) or 15001 (outbound).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The original destination of a REDIRECTed connection. Fails (NotFound)
/// for a connection that was not redirected, e.g. one dialled straight at
/// 15001 or 15006: once the nat table has rules, the kernel answers such a
/// query with the socket's own local address, and following it would make
/// the sidecar dial its own listener in a loop (a peer could trigger that
/// remotely by dialling a pod's 15001).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = if local.is_ipv6() {
        sock.original_dst_v6()?
    } else {
        sock.original_dst_v4()?
    };
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an IP socket address"))?;
    if addr == local {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "connection was not redirected (its original destination is the listener itself)",
        ));
    }
    Ok(addr)
}
