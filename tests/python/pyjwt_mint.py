#!/usr/bin/env python3
"""Mints step-up tokens with PyJWT and keys of its own (cryptography), so the
Rust verifier is checked against a foreign encoder.

Usage: pyjwt_mint.py ISSUER AUDIENCE SUB. Prints one JSON object:
{"jwks": {...}, "tokens": {name: token}}.
"""
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

iss, aud, sub = sys.argv[1:4]
now = int(time.time())
ec_key = ec.generate_private_key(ec.SECP256R1())
rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(alg_cls, key, kid, alg):
    d = json.loads(alg_cls.to_jwk(key.public_key()))
    d.update({"kid": kid, "alg": alg, "use": "sig"})
    return d


jwks = {"keys": [
    jwk(ECAlgorithm, ec_key, "py-ec", "ES256"),
    jwk(RSAAlgorithm, rsa_key, "py-rsa", "RS256"),
    jwk(RSAAlgorithm, rsa_key, "py-pss", "PS256"),
]}
base = {"iss": iss, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + 600,
        "auth_time": now, "acr": "urn:stepmesh:acr:mfa", "amr": ["pwd", "mfa"]}


def es(claims, **headers):
    return jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "py-ec", **headers})


tokens = {
    "es256": es(base),
    "rs256": jwt.encode(base, rsa_key, algorithm="RS256", headers={"kid": "py-rsa"}),
    "ps256": jwt.encode(base, rsa_key, algorithm="PS256", headers={"kid": "py-pss"}),
    # The JWK of py-rsa pins RS256: a PS256 token under that kid is refused.
    "ps256_on_rs256_kid": jwt.encode(base, rsa_key, algorithm="PS256", headers={"kid": "py-rsa"}),
    "expired": es({**base, "exp": now - 3600}),
    "wrong_aud": es({**base, "aud": "someone-else"}),
    "weak_acr": es({**base, "acr": "urn:stepmesh:acr:pwd"}),
    "none": jwt.encode(base, None, algorithm="none", headers={"kid": "py-ec"}),
    "at_jwt": es(base, typ="at+jwt"),
}
print(json.dumps({"jwks": jwks, "tokens": tokens}))
