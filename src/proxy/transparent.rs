//! Transparent interception: the destination a redirected connection was
//! meant for, read with `SO_ORIGINAL_DST` after `stepmesh init`'s iptables
//! REDIRECT sent it to 15006 (inbound) or 15001 (outbound).

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

/// The original destination of a REDIRECTed connection. Fails (NotFound)
/// for a connection that was not redirected, e.g. one dialled straight at
/// 15001 or 15006: once the nat table has rules, the kernel answers such a
/// query with the socket's own local address, and following it would make
/// the sidecar dial its own listener in a loop (a peer could trigger that
/// remotely by dialling a pod's 15001).
///
/// The listeners are dual-stack, so an IPv4 connection shows a v4-mapped
/// local address (`::ffff:a.b.c.d`); its original destination is asked for
/// at the IPv4 level (`SO_ORIGINAL_DST`), where the nat entry lives.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = canonical(stream.local_addr()?);
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

/// Whether `dst`, the original destination of a connection `stream`
/// accepted on the inbound listener, is an address of this pod (network
/// namespace). A neighbour on the pod's link can route packets for any
/// address to the pod's interface; PREROUTING's REDIRECT catches them all,
/// and forwarding to a foreign destination would make the sidecar dial a
/// host of the neighbour's choosing from the pod's address.
///
/// REDIRECT rewrites the destination to the incoming interface's primary
/// address, so a connection to that address is the pod's at a glance. Any
/// other (a secondary address) is asked of the kernel: binding a socket to
/// an address succeeds only for a local one (one socket, one `bind`, both
/// non-blocking, only off the common path). Loopback never arrives from
/// outside (the kernel drops it as martian) and is refused too.
pub fn is_own_address(stream: &TcpStream, dst: IpAddr) -> bool {
    let dst = dst.to_canonical();
    if stream
        .local_addr()
        .is_ok_and(|local| local.ip().to_canonical() == dst)
    {
        return true;
    }
    !dst.is_loopback()
        && !dst.is_unspecified()
        && !dst.is_multicast()
        && std::net::UdpSocket::bind((dst, 0)).is_ok()
}

/// `addr` with a v4-mapped IPv6 address (`[::ffff:10.0.0.1]:80`, how a
/// dual-stack listener sees IPv4) turned into the IPv4 one (`10.0.0.1:80`).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::canonical;

    #[test]
    fn v4_mapped_addresses_become_ipv4() {
        let mapped = "[::ffff:10.0.0.1]:8080".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "10.0.0.1:8080");
        let v6 = "[fd00::1]:8080".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
