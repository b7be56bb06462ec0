#!/usr/bin/env python3
"""Regenerates the seed corpora of fuzz/seeds/<target>/ from the project's
own fixtures (tests/fixtures, deploy/, docs/) plus a few hand-written inputs,
in each target's input format (see the doc comment of each target).

Certificates and CSRs are made with the openssl CLI, so the seeds are real
DER in the shapes the code meets. Run from anywhere:
    python3 fuzz/seeds/generate.py
"""
import base64
import json
import pathlib
import re
import shutil
import struct
import subprocess
import tempfile

FUZZ = pathlib.Path(__file__).resolve().parent.parent
ROOT = FUZZ.parent
SEEDS = FUZZ / "seeds"


def put(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def der_of(pem_path):
    text = pathlib.Path(pem_path).read_text()
    blocks = re.findall(r"-----BEGIN ([A-Z ]+)-----\n(.*?)-----END \1-----", text, re.S)
    return [base64.b64decode("".join(b.split())) for _, b in blocks]


def pki(tmp):
    """root -> intermediate -> leaf with spiffe://fuzz.test/ns/a/sa/b; a CSR."""
    ext = tmp / "ext.cnf"
    ext.write_text(
        "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "nameConstraints=critical,permitted;URI:.fuzz.test,permitted;URI:fuzz.test\n"
        "[leaf]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:spiffe://fuzz.test/ns/a/sa/b\n"
        "[req]\ndistinguished_name=dn\nreq_extensions=san\n[dn]\n"
        "[san]\nsubjectAltName=URI:spiffe://td/ns/a/sa/b\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "root.key", "-out", "root.pem", "-subj", "/CN=root",
            "-days", "3650", "-extensions", "ca", "-config", "ext.cnf", cwd=tmp)
    openssl("req", "-new", *ec, "-keyout", "int.key", "-out", "int.csr", "-subj", "/CN=int",
            "-config", "ext.cnf", cwd=tmp)
    openssl("x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root.key",
            "-CAcreateserial", "-out", "int.pem", "-days", "3650", "-extfile", "ext.cnf",
            "-extensions", "ca", cwd=tmp)
    openssl("req", "-new", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/",
            "-config", "ext.cnf", cwd=tmp)
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "int.pem", "-CAkey", "int.key",
            "-CAcreateserial", "-out", "leaf.pem", "-days", "3650", "-extfile", "ext.cnf",
            "-extensions", "leaf", cwd=tmp)
    openssl("req", "-new", "-newkey", "ed25519", "-nodes", "-keyout", "ed.key",
            "-out", "ed.csr", "-subj", "/CN=ed", "-config", "ext.cnf", cwd=tmp)
    return {
        "root": der_of(tmp / "root.pem")[0],
        "int": der_of(tmp / "int.pem")[0],
        "leaf": der_of(tmp / "leaf.pem")[0],
        "root_pem": (tmp / "root.pem").read_text(),
        "int_pem": (tmp / "int.pem").read_text(),
        "csr": der_of(tmp / "leaf.csr")[0],
        "csr_ed": der_of(tmp / "ed.csr")[0],
    }


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    for d in SEEDS.iterdir():
        if d.is_dir():
            shutil.rmtree(d)

    # spiffe_id: IDs, patterns and trust domains, valid and not.
    for i, s in enumerate([
        "spiffe://cluster.local/ns/default/sa/default",
        "spiffe://cluster.local",
        "spiffe://cluster.local/ns/ops/*",
        "spiffe://td/*",
        "spiffe://td/a/../b",
        "spiffe://TD/a",
        "spiffe://user@td:443/a?q#f",
        "spiffe://td/a%2Fb",
        "cluster.local",
        "spiffe://td//a/",
    ]):
        put("spiffe_id", f"{i:02}", s)

    with tempfile.TemporaryDirectory() as t:
        p = pki(pathlib.Path(t))

    # svid_verify: mode 0 = [n][len u16][cert]..[last]; 1 = [pick][edits];
    # 2 = PEM text.
    chain3 = bytes([0, 2]) + struct.pack(">H", len(p["leaf"])) + p["leaf"] \
        + struct.pack(">H", len(p["int"])) + p["int"] + p["root"]
    put("svid_verify", "raw-chain3", chain3)
    put("svid_verify", "raw-leaf", bytes([0, 0]) + p["leaf"])
    put("svid_verify", "raw-chain2", bytes([0, 1]) + struct.pack(">H", len(p["leaf"]))
        + p["leaf"] + p["int"])
    put("svid_verify", "edit-none", bytes([1, 0]))
    put("svid_verify", "edit-one", bytes([1, 0, 0, 200, 1]))
    put("svid_verify", "edit-defect", bytes([1, 1, 1, 44, 0x80]))
    put("svid_verify", "bundle-pem", b"\x02" + (p["root_pem"] + p["int_pem"]).encode())

    # csr_identity: mode 0 = raw DER; 1 = URI SAN lines for a built CSR.
    put("csr_identity", "raw-p256", b"\x00" + p["csr"])
    put("csr_identity", "raw-ed25519", b"\x00" + p["csr_ed"])
    put("csr_identity", "built-none", b"\x01")
    put("csr_identity", "built-one", b"\x01spiffe://td/ns/a/sa/b")
    put("csr_identity", "built-two", b"\x01spiffe://td/ns/a/sa/b\nspiffe://td/ns/c/sa/d")
    put("csr_identity", "built-other", b"\x01https://example.com/x")

    # jwt: mode 0 = a token; 1 = claims JSON of a properly signed token.
    sa = json.loads((ROOT / "tests/fixtures/k8s/projected-sa-token-decoded.json").read_text())
    sig = b64url(b"\x00" * 256)
    tok = lambda h, c: f"{b64url(json.dumps(h).encode())}.{b64url(json.dumps(c).encode())}.{sig}"
    put("jwt", "raw-k8s", b"\x00" + tok(sa["header"], sa["claims"]).encode())
    put("jwt", "raw-none", b"\x00" + tok({"alg": "none"}, sa["claims"]).encode()[:-len(sig)])
    put("jwt", "raw-hs256", b"\x00" + tok({"alg": "HS256", "typ": "JWT"}, {"iss": "x"}).encode())
    put("jwt", "raw-es256-crit", b"\x00" + tok({"alg": "ES256", "crit": ["b64"]}, {}).encode())
    far = 4102444800  # 2100-01-01
    k8s_claims = {
        "iss": "https://idp.fuzz.test", "aud": ["stepmesh-fuzz"], "exp": far, "nbf": 0, "iat": 0,
        "sub": "system:serviceaccount:default:default",
        "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "default", "uid": "u"}},
    }
    put("jwt", "signed-k8s", b"\x01" + json.dumps(k8s_claims).encode())
    put("jwt", "signed-stepup", b"\x01" + json.dumps({
        "iss": "https://idp.fuzz.test", "aud": "stepmesh-fuzz", "exp": far, "sub": "alice",
        "acr": "urn:stepmesh:acr:mfa", "amr": ["mfa", "pwd"], "auth_time": 1.5,
        "azp": "spiffe://td/ns/a/sa/b", "cnf": {"x5t#S256": "abc"}}).encode())
    put("jwt", "signed-expired", b"\x01" + json.dumps({
        "iss": "https://idp.fuzz.test", "aud": ["x", "stepmesh-fuzz"], "exp": 1}).encode())

    # jwks: the API server's keys, a step-up provider's, odd ones.
    put("jwks", "apiserver", (ROOT / "tests/fixtures/k8s/apiserver-openid-v1-jwks.json").read_bytes())
    put("jwks", "mixed", json.dumps({"keys": [
        {"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "e1",
         "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
         "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "o1",
         "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        {"kty": "oct", "kid": "h1", "k": "c2VjcmV0"},
        {"kty": "RSA", "use": "enc", "kid": "enc1", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"}]}))
    put("jwks", "empty", '{"keys": []}')

    # policy: the shipped examples and the documented full file.
    for f in sorted((ROOT / "deploy/example").glob("policy-*.yaml")):
        put("policy", f.stem, f.read_bytes())
    doc = (ROOT / "docs/POLICY.md").read_text()
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc, re.S)):
        put("policy", f"docs-{i}", block)
    put("policy", "audit-routes", """trustDomain: td
mode: audit
inbound:
  default: allow-authenticated
  ports:
    - port: 80
      protocol: http
      allow: [{from: [spiffe://td/*]}]
      routes:
        - match: {path: /admin/*}
          from: [spiffe://td/ns/ops/sa/admin]
        - match: {methods: [GET], path: /}
outbound:
  default: deny
  rules:
    - to: {cidrs: [10.0.0.0/8, "::1/128"], ports: [80, 443]}
      action: mtls
""")

    # admission_review: every AdmissionReview fixture, compact.
    for f in [ROOT / "tests/fixtures/k8s/admissionreview-pod-create.json",
              *sorted((ROOT / "tests/fixtures/admission").glob("*.json"))]:
        doc = json.loads(f.read_text())
        put("admission_review", f.stem, json.dumps(doc, separators=(",", ":")))

    # h1_head: byte 0 even = request; odd = response to METHODS[(b/2)%4].
    reqs = [
        b"GET /a?b=c HTTP/1.1\r\nHost: api\r\nX-Thing: 1\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\nExpect: 100-continue\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\nhello",
        b"GET http://a/b HTTP/1.0\nConnection: keep-alive\n\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nProxy-Authorization: x\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
        # Underscore spellings of dropped fields (CGI-style apps read them as ours).
        b"GET /s HTTP/1.1\r\nHost: a\r\nX_Stepup_Sub: root\r\nx-forwarded_client-cert: URI=x\r\nX_Kept: 1\r\n\r\n",
    ]
    for i, r in enumerate(reqs):
        put("h1_head", f"req-{i}", b"\x00" + r)
    resps = [
        (0, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        (2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
        (0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"),
        (0, b"HTTP/1.0 404 Nope\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n\r\n"),
        (6, b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
        (4, b"HTTP/1.1 204 No Content\r\n\r\n"),
    ]
    for i, (m, r) in enumerate(resps):
        put("h1_head", f"resp-{i}", bytes([m + 1]) + r)

    # h1_chunked: two cut bytes, then the wire.
    bodies = [
        b"5\r\nhello\r\n1a;ext=\"x\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\n\r\nGET /next HTTP/1.1\r\n",
        b"0\r\n\r\n",
        b"A\r\n0123456789\r\n",
        b"fffffffffffffffff\r\n",
        b"3 ; a=b\t\r\nabc\r\n0\r\nx: y\r\nz: w\r\n\r\n",
    ]
    for i, b in enumerate(bodies):
        put("h1_chunked", f"{i:02}", bytes([37, 181]) + b)

    # path_canon: byte 0 = pathMatch (case x params) and method; then the
    # target and optional Host lines. Hostile shapes from tests/hostile_targets.rs.
    targets = [
        "/admin/x", "/ADMIN/x", "/Admin;x/y", "/admin%2Fx", "/%61dmin/x", "/admin/./x",
        "/a/..;/admin", "//admin", "/admin\\x", "/caf%C3%A9/x", "/CAF%C3%89/x",
        "/users/", "/users;a/1", "/API/v1/x", "/api/v1/x", "/login", "/Login/",
        "http://a/admin?x\na", "http://u@a/admin\na", "/x\na\nb", "/%00", "/%zz", "*",
    ]
    for i, t in enumerate(targets):
        put("path_canon", f"{i:02}", bytes([(7 * i) % 45]) + t.encode())

    h2_frames()


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def h2_frames():
    """h2_frames: two cut bytes, then a client's frames after the preface
    (the shapes of tests/h2_header_deadline.rs and the frame tracker's unit
    tests)."""
    settings = h2_frame(0x4, 0, 0, struct.pack(">HI", 0x4, 65535))
    block = bytes([0x82, 0x86, 0x04, 0x03]) + b"/ok" + bytes([0x41, 0x03]) + b"app"
    streams = [
        settings,
        settings + h2_frame(0x1, 0x5, 1, block),
        settings + h2_frame(0x1, 0x1, 1, block[:5]) + h2_frame(0x9, 0, 1, b"")
        + h2_frame(0x9, 0x4, 1, block[5:]),
        settings + h2_frame(0x1, 0x4 | 0x8 | 0x20, 1, bytes([2]) + bytes(5) + block + bytes(2))
        + h2_frame(0x0, 0x1, 1, bytes(300)),
        settings + h2_frame(0x6, 0, 0, bytes(8)) + h2_frame(0x8, 0, 0, struct.pack(">I", 1 << 20)),
        settings + bytes([0xFF, 0xFF, 0xFF, 0x0, 0x0, 0, 0, 0, 1]) + bytes(40),
    ]
    for i, w in enumerate(streams):
        put("h2_frames", f"{i:02}", bytes([29, 211]) + w)


if __name__ == "__main__":
    main()
