"""JWTs for keyswap's tests, minted by an independent implementation (PyJWT + cryptography).

    jwt_tool.py keygen DIR KID rsa|ec     writes DIR/KID.key.pem and DIR/KID.pub.pem, prints the public JWK
    jwt_tool.py sign ALG KEY KID CLAIMS   ALG RS256|ES256 (KEY: private PEM file), HS256 (KEY: the secret),
                                          none (KEY ignored); KID "-" for none; CLAIMS is JSON;
                                          "exp"/"nbf"/"iat" given as offsets from now in seconds
    jwt_tool.py confuse PUBPEM KID CLAIMS HS256 with the bytes of an RSA public key as the HMAC secret
                                          (the algorithm-confusion attack; PyJWT refuses to do it, so by hand)
"""
import base64
import hashlib
import hmac
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def claims(text):
    c = json.loads(text)
    now = int(time.time())
    for k in ("exp", "nbf", "iat"):
        if k in c:
            c[k] = now + int(c[k])
    return c


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main(argv):
    cmd = argv[1]
    if cmd == "keygen":
        out, kid, kind = argv[2], argv[3], argv[4]
        key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
        with open(f"{out}/{kid}.key.pem", "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        pub = key.public_key()
        with open(f"{out}/{kid}.pub.pem", "wb") as f:
            f.write(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        algo = jwt.algorithms.RSAAlgorithm if kind == "rsa" else jwt.algorithms.ECAlgorithm
        jwk = json.loads(algo.to_jwk(pub))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256" if kind == "rsa" else "ES256"})
        print(json.dumps(jwk))
    elif cmd == "sign":
        alg, key, kid, c = argv[2], argv[3], argv[4], claims(argv[5])
        headers = {} if kid == "-" else {"kid": kid}
        if alg == "none":
            print(jwt.encode(c, None, algorithm="none", headers=headers))
        elif alg == "HS256":
            print(jwt.encode(c, key, algorithm="HS256", headers=headers))
        else:
            with open(key, "rb") as f:
                print(jwt.encode(c, f.read(), algorithm=alg, headers=headers))
    elif cmd == "confuse":
        pub, kid, c = argv[2], argv[3], claims(argv[4])
        with open(pub, "rb") as f:
            secret = f.read()
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        body = b64(json.dumps(c).encode())
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        print(f"{head}.{body}.{b64(sig)}")
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
