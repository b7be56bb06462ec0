#!/usr/bin/env python3
"""A foreign gRPC client of the stepmesh CA (used by tests/ca_python.rs).

Generates the Python stubs from proto/ with grpc_tools.protoc into a temp
dir, connects over TLS trusting bundle.pem alone, calls GetTrustBundle and
Sign (with a join token), a Sign with a bad token, and a Revoke with no
credential at all. Prints one JSON object.
"""
import argparse
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def generate(proto_dir, out_dir):
    import grpc_tools
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main([
        "protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(proto_dir, "stepmesh", "ca", "v1", "ca.proto"),
    ])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--csr", required=True)
    p.add_argument("--proto-dir", required=True)
    p.add_argument("--revoke-id", required=True)
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as out_dir:
        generate(a.proto_dir, out_dir)
        from stepmesh.ca.v1 import ca_pb2, ca_pb2_grpc

        with open(a.bundle, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        with open(a.csr) as f:
            csr = f.read()
        with grpc.secure_channel(a.addr, creds) as channel:
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
            bundle = stub.GetTrustBundle(ca_pb2.GetTrustBundleRequest(), timeout=30)
            signed = stub.Sign(
                ca_pb2.SignRequest(csr_pem=csr, ttl_seconds=3600),
                metadata=[("authorization", f"Bearer {a.token}")],
                timeout=30,
            )
            try:
                stub.Sign(
                    ca_pb2.SignRequest(csr_pem=csr),
                    metadata=[("authorization", "Bearer not-a-token")],
                    timeout=30,
                )
                bad_code = "OK"
            except grpc.RpcError as e:
                bad_code = e.code().name
            try:
                stub.Revoke(ca_pb2.RevokeRequest(id=a.revoke_id, reason="no credential"),
                            timeout=30)
                unauthenticated = {"code": "OK"}
            except grpc.RpcError as e:
                unauthenticated = {"code": e.code().name, "details": e.details()}
        print(json.dumps({
            "trust_domain": bundle.trust_domain,
            "bundle_pem": bundle.bundle_pem,
            "sequence": bundle.sequence,
            "cert_chain_pem": list(signed.cert_chain_pem),
            "trust_bundle_pem": signed.trust_bundle_pem,
            "expires_at": signed.expires_at,
            "bad_token_code": bad_code,
            "revoke_without_credential": unauthenticated,
        }))


if __name__ == "__main__":
    main()
