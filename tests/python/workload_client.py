"""A foreign SPIFFE Workload API client for tests/workload_api.rs: py-spiffe
(the `spiffe` package, unchanged) against the sidecar's --workload-api
socket, found through SPIFFE_ENDPOINT_SOCKET as any app would.

Subcommands (each prints JSON on stdout, one object per line):
  fetch HOST:PORT   fetch the X.509-SVID and the bundles, then open an mTLS
                    connection with them to HOST:PORT (a sidecar's inbound
                    listener in front of an echo app) and echo a line
  watch N SECONDS   stream X.509 contexts (no reconnect allowed); print each
                    update; exit after N updates or SECONDS
  raw HEADER        one FetchX509SVID call with py-spiffe's generated stubs,
                    with (HEADER=yes) or without (no) the security header;
                    print the gRPC status code and details
  jwt AUD           fetch a JWT-SVID for AUD and the JWT bundles with py-spiffe,
                    validate it through the sidecar (for AUD and for another
                    audience), verify it with PyJWT against the bundle's key,
                    and have the sidecar validate a token signed by a key of
                    our own under the bundle's kid
  validate TOKEN AUD
                    have the sidecar validate TOKEN for AUD; print the SPIFFE
                    ID or the refusal
  hold N SECONDS    open N FetchX509SVID streams (100 a channel, each read to
                    its first message), print a line, keep them SECONDS
  protocheck PROTO  compare proto/spiffe/workload.proto, compiled here, with
                    the descriptor py-spiffe ships (upstream's)
"""

import json
import os
import socket
import ssl
import sys
import tempfile
import threading
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


def out(**kv):
    print(json.dumps(kv), flush=True)


def socket_path():
    endpoint = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    assert endpoint.startswith("unix://"), endpoint
    return endpoint[len("unix://"):]


def describe(svid):
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(svid.leaf.serial_number, "x"),
        "chain": len(svid.cert_chain),
    }


def fetch(target):
    from spiffe import WorkloadApiClient

    with WorkloadApiClient(default_timeout=10) as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        tds = sorted(str(b.trust_domain) for b in bundles.bundles)
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None, "no bundle for the SVID's trust domain"
    with tempfile.TemporaryDirectory() as d:
        chain = os.path.join(d, "chain.pem")
        key = os.path.join(d, "key.pem")
        roots = os.path.join(d, "bundle.pem")
        with open(chain, "wb") as f:
            for cert in svid.cert_chain:
                f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key, "wb") as f:
            f.write(svid.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        with open(roots, "wb") as f:
            for cert in bundle.x509_authorities:
                f.write(cert.public_bytes(serialization.Encoding.PEM))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # SPIFFE: the peer is named by its URI SAN, not a DNS name.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(roots)
        ctx.load_cert_chain(chain, key)
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
                uris = peer.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value.get_values_for_type(
                        x509.UniformResourceIdentifier)
                tls.sendall(b"hello from py-spiffe\n")
                echoed = b""
                while not echoed.endswith(b"\n"):
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    echoed += chunk
                version = tls.version()
    out(**describe(svid), bundle_trust_domains=tds, peer=uris,
        echoed=echoed.decode(), tls=version)


def watch(n, seconds):
    from spiffe import WorkloadApiClient

    done = threading.Event()
    seen = []

    def on_success(ctx):
        svid = ctx.default_svid
        seen.append(svid)
        out(update=len(seen), **describe(svid))
        if len(seen) >= n:
            done.set()

    def on_error(err):
        out(error=str(err))
        done.set()

    client = WorkloadApiClient()
    handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
    done.wait(seconds)
    handle.cancel()
    client.close()
    out(done=len(seen))


def raw(header):
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    channel = grpc.insecure_channel("unix://" + socket_path())
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    metadata = [("workload.spiffe.io", "true")] if header == "yes" else []
    call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=10)
    try:
        first = next(call)
        out(code="OK", svids=len(first.svids))
    except grpc.RpcError as e:
        out(code=e.code().name, details=e.details())
    finally:
        call.cancel()
        channel.close()


def jwt_svids(aud):
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from spiffe import WorkloadApiClient

    def refusal(call):
        try:
            call()
            return "accepted"
        except Exception as e:  # py-spiffe wraps the gRPC error
            return type(e).__name__ + ": " + str(e)

    with WorkloadApiClient(default_timeout=10) as client:
        svid = client.fetch_jwt_svid(audience={aud})
        token = svid.token
        validated = client.validate_jwt_svid(token, aud)
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        kid = pyjwt.get_unverified_header(token)["kid"]
        key = bundle.get_jwt_authority(kid)
        claims = pyjwt.decode(token, key=key, algorithms=["ES256"], audience=aud)
        other_audience = refusal(lambda: client.validate_jwt_svid(token, "not-" + aud))
        mine = ec.generate_private_key(ec.SECP256R1())
        forged = pyjwt.encode(
            {"sub": str(svid.spiffe_id), "aud": [aud], "exp": int(time.time()) + 60},
            mine, algorithm="ES256", headers={"kid": kid})
        other_key = refusal(lambda: client.validate_jwt_svid(forged, aud))
        wrong_for_pyjwt = refusal(lambda: pyjwt.decode(
            forged, key=key, algorithms=["ES256"], audience=aud))
    out(spiffe_id=str(svid.spiffe_id), validated=str(validated.spiffe_id),
        kids=sorted(bundle.jwt_authorities.keys()), pyjwt_sub=claims["sub"],
        pyjwt_aud=claims["aud"], ttl=claims["exp"] - claims["iat"],
        other_audience=other_audience, other_key=other_key,
        pyjwt_other_key=wrong_for_pyjwt)


def validate(token, aud):
    from spiffe import WorkloadApiClient

    with WorkloadApiClient(default_timeout=10) as client:
        try:
            svid = client.validate_jwt_svid(token, aud)
            out(validated=str(svid.spiffe_id))
        except Exception as e:  # py-spiffe wraps the gRPC error
            out(refused=type(e).__name__ + ": " + str(e))


def hold(n, seconds):
    from spiffe._proto import workload_pb2, workload_pb2_grpc

    metadata = [("workload.spiffe.io", "true")]
    channels, calls = [], []
    for i in range(n):
        if i % 100 == 0:
            channels.append(grpc.insecure_channel("unix://" + socket_path()))
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channels[-1])
        call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata)
        assert len(next(call).svids) == 1
        calls.append(call)
    out(open=len(calls), channels=len(channels))
    time.sleep(seconds)
    for call in calls:
        call.cancel()


def protocheck(proto):
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc
    from spiffe._proto import workload_pb2 as upstream

    root = os.path.dirname(os.path.dirname(proto))
    # Compiled to a descriptor set, not imported: the same message names
    # would clash with py-spiffe's in the default descriptor pool.
    fdp = descriptor_pb2.FileDescriptorSet()
    with tempfile.TemporaryDirectory() as d:
        rc = protoc.main(["protoc", "-I" + root, "-I" + os.path.join(
            os.path.dirname(protoc.__file__), "_proto"), "--include_imports",
            "--descriptor_set_out=" + os.path.join(d, "set.pb"), proto])
        assert rc == 0, "protoc failed"
        with open(os.path.join(d, "set.pb"), "rb") as f:
            fdp.ParseFromString(f.read())
    ours = [f for f in fdp.file if f.name.endswith("workload.proto")][0]
    theirs = descriptor_pb2.FileDescriptorProto()
    upstream.DESCRIPTOR.CopyToProto(theirs)

    def shape(fd):
        msgs = {}
        for m in fd.message_type:
            msgs[m.name] = sorted((f.name, f.number, f.type, f.label, f.type_name) for f in m.field)
        svcs = {s.name: sorted((m.name, m.input_type, m.output_type, m.client_streaming,
                                m.server_streaming) for m in s.method) for s in fd.service}
        return {"package": fd.package, "messages": msgs, "services": svcs}

    a, b = shape(ours), shape(theirs)
    out(same=a == b, package=a["package"], messages=len(a["messages"]),
        methods=sum(len(v) for v in a["services"].values()),
        ours=a if a != b else None, upstream=b if a != b else None)


def main():
    cmd = sys.argv[1]
    if cmd == "fetch":
        fetch(sys.argv[2])
    elif cmd == "watch":
        watch(int(sys.argv[2]), float(sys.argv[3]))
    elif cmd == "raw":
        raw(sys.argv[2])
    elif cmd == "jwt":
        jwt_svids(sys.argv[2])
    elif cmd == "validate":
        validate(sys.argv[2], sys.argv[3])
    elif cmd == "hold":
        hold(int(sys.argv[2]), float(sys.argv[3]))
    elif cmd == "protocheck":
        protocheck(sys.argv[2])
    else:
        sys.exit("unknown subcommand " + cmd)


if __name__ == "__main__":
    main()
