"""A fake AWS `bedrock-runtime` endpoint that checks every request's SigV4 signature on its own,
with botocore, against the real credentials it is given. Serves HTTPS (HTTP/1.1) on loopback.

usage: bedrock_fake.py --cert FILE --key FILE [--port N] [--port-file FILE]
                       --access-key-id AKID --secret-access-key SECRET [--session-token TOKEN]
                       [--region us-east-1] [--service bedrock] [--log FILE] [--max-skew-seconds 900]

Verified requests get canned answers: POST /model/{id}/converse a Converse response,
POST /model/{id}/invoke an Anthropic Messages body, anything else 404. Requests that fail
verification get a 403 shaped like AWS's. One JSON object per request is appended to --log.
"""
import argparse
import datetime
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import ssl
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

MAX_BODY = 16 * 1024 * 1024
SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)
INVALID_TOKEN = "The security token included in the request is invalid."
AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=([^,\s]+)\s*,\s*SignedHeaders=([^,\s]+)\s*,\s*Signature=([0-9a-f]{64})\s*$"
)
DATE_RE = re.compile(r"^\d{8}T\d{6}Z$")
MODEL_RE = re.compile(r"^/model/([^/]+)/(converse|invoke)$")

CONVERSE_RESPONSE = {
    "output": {"message": {"role": "assistant", "content": [{"text": "hello from fake bedrock"}]}},
    "stopReason": "end_turn",
    "usage": {"inputTokens": 11, "outputTokens": 7, "totalTokens": 18},
    "metrics": {"latencyMs": 5},
}
INVOKE_RESPONSE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "text", "text": "hello from fake bedrock"}],
    "model": "claude",
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 11, "output_tokens": 7},
}


class Rejected(Exception):
    """A request that AWS would refuse: an HTTP status, an AWS error type and a message."""

    def __init__(self, status, error_type, message):
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


class BadRequest(Exception):
    pass


class ExactHeadersSigV4(SigV4Auth):
    """SigV4Auth that canonicalises exactly the headers it is handed, as the AWS side does.

    Stock SigV4Auth.headers_to_sign drops a blacklist of headers (user-agent, transfer-encoding,
    expect, ...) and invents `host` from the URL when absent: right for a signer, wrong for a
    verifier. Everything else (path normalisation and quoting, query, header value trimming,
    payload hash, string to sign, key derivation) is botocore's own."""

    def headers_to_sign(self, request):
        headers = HTTPHeaders()
        for name, value in request.headers.items():
            headers[name.lower()] = value
        return headers


def verify(cfg, method, target, headers, body):
    """Check a request's SigV4 signature. Returns facts for the log; raises Rejected."""
    facts = {"access_key_id": None, "signed_headers": None, "scope_region": None, "scope_service": None}
    auth = headers.get_all("Authorization") or []
    if not auth:
        raise Rejected(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    if len(auth) > 1:
        raise Rejected(403, "IncompleteSignatureException", "More than one Authorization header.")
    match = AUTH_RE.match(auth[0].strip())
    if not match:
        raise Rejected(
            403,
            "IncompleteSignatureException",
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters "
            "in the form AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=<64 hex>.",
        )
    credential, signed, signature = match.groups()
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise Rejected(403, "IncompleteSignatureException", f"Credential is malformed: {credential!r}.")
    akid, scope_date, scope_region, scope_service, _ = parts
    signed_headers = signed.split(";")
    facts.update(
        access_key_id=akid, signed_headers=signed_headers, scope_region=scope_region, scope_service=scope_service
    )
    if akid != cfg.access_key_id:
        raise Rejected(403, "UnrecognizedClientException", INVALID_TOKEN)
    if signed_headers != sorted(set(signed_headers)) or any(h != h.lower() or not h for h in signed_headers):
        raise Rejected(403, "IncompleteSignatureException", "SignedHeaders must be lowercase, sorted and unique.")

    # the security token must be exactly the configured one (or absent if none is configured)
    tokens = headers.get_all("X-Amz-Security-Token") or []
    if cfg.session_token is None:
        if tokens:
            raise Rejected(403, "UnrecognizedClientException", INVALID_TOKEN + " (unexpected x-amz-security-token)")
    elif tokens != [cfg.session_token]:
        raise Rejected(403, "UnrecognizedClientException", INVALID_TOKEN)

    for required in ["host", "x-amz-date"] + (["x-amz-security-token"] if tokens else []):
        if required not in signed_headers:
            raise Rejected(403, "InvalidSignatureException", f"'{required}' must be a signed header.")
    dates = headers.get_all("X-Amz-Date") or []
    if len(dates) != 1 or not DATE_RE.match(dates[0]):
        raise Rejected(403, "IncompleteSignatureException", "Missing or malformed X-Amz-Date header.")
    amz_date = dates[0]
    if scope_date != amz_date[:8]:
        raise Rejected(403, "InvalidSignatureException", f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{scope_date}' != '{amz_date[:8]}'.")
    if cfg.max_skew_seconds > 0:
        try:
            when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            raise Rejected(403, "IncompleteSignatureException", "Malformed X-Amz-Date header.")
        skew = abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds())
        if skew > cfg.max_skew_seconds:
            raise Rejected(403, "InvalidSignatureException", f"Signature expired: {amz_date} is {int(skew)}s away from now.")
    if scope_region != cfg.region:
        raise Rejected(403, "InvalidSignatureException", f"Credential should be scoped to a valid region, not '{scope_region}'. {SIGNATURE_MISMATCH}")
    if scope_service != cfg.service:
        raise Rejected(403, "InvalidSignatureException", f"Credential should be scoped to correct service: '{cfg.service}'. {SIGNATURE_MISMATCH}")

    content_sha = headers.get_all("X-Amz-Content-SHA256") or []
    if content_sha and content_sha[-1] not in ("UNSIGNED-PAYLOAD", hashlib.sha256(body).hexdigest()):
        raise Rejected(403, "InvalidSignatureException", "x-amz-content-sha256 does not match the body.")

    # feed botocore exactly what was received: only the signed headers, with every received value
    hosts = headers.get_all("Host") or []
    if len(hosts) != 1:
        raise Rejected(403, "IncompleteSignatureException", "Exactly one Host header is required.")
    to_sign = HTTPHeaders()
    for name in signed_headers:
        values = headers.get_all(name)
        if values is None:
            raise Rejected(403, "InvalidSignatureException", f"Signed header '{name}' is not in the request.")
        for value in values:
            to_sign[name] = value
    request = AWSRequest(method=method, url=f"https://{hosts[0]}{target}", headers=to_sign, data=body)
    request.context["timestamp"] = amz_date
    signer = ExactHeadersSigV4(Credentials(cfg.access_key_id, cfg.secret_access_key, cfg.session_token), cfg.service, cfg.region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if signer.signed_headers(signer.headers_to_sign(request)) != signed:
        raise Rejected(403, "InvalidSignatureException", SIGNATURE_MISMATCH + " (SignedHeaders differ)")
    if not hmac.compare_digest(expected, signature):
        if cfg.debug_canonical:
            sys.stderr.write(f"bedrock_fake: signature mismatch, our canonical request:\n{canonical}\n")
        raise Rejected(403, "InvalidSignatureException", SIGNATURE_MISMATCH)
    return facts


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeBedrock/1.0"
    timeout = 60  # idle keep-alive connections are closed after this

    def log_message(self, format, *args):
        if not self.server.cfg.quiet:
            sys.stderr.write("bedrock_fake: %s %s\n" % (self.address_string(), format % args))

    def _read_body(self):
        te = ",".join(self.headers.get_all("Transfer-Encoding") or []).lower()
        if te:
            if [t.strip() for t in te.split(",")][-1] != "chunked":
                raise BadRequest(f"unsupported Transfer-Encoding {te!r}")
            body = bytearray()
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise BadRequest("truncated chunk size line")
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
                if size < 0 or len(body) + size > MAX_BODY:
                    raise BadRequest("bad chunk size")
                if size == 0:
                    while True:  # trailers, up to the empty line
                        trailer = self.rfile.readline(65537)
                        if not trailer.endswith(b"\n"):
                            raise BadRequest("truncated trailers")
                        if trailer in (b"\r\n", b"\n"):
                            return bytes(body)
                chunk = self.rfile.read(size)
                if len(chunk) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise BadRequest("truncated chunk")
                body += chunk
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            raise BadRequest("bad Content-Length")
        length = int(lengths[0])
        if length > MAX_BODY:
            raise BadRequest("body too large")
        body = self.rfile.read(length)
        if len(body) != length:
            raise BadRequest("truncated body")
        return body

    def _send(self, status, payload, extra_headers=()):
        data = json.dumps(payload).encode()
        self.entry["status"] = status
        # Logged before the answer leaves: a test reads the log as soon as its client has the
        # answer.
        self._log_once()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", "00000000-0000-4000-8000-000000000000")
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _handle(self):
        cfg = self.server.cfg
        target = self.path
        split = urllib.parse.urlsplit(target)
        if split.scheme and split.netloc:  # absolute-form: keep the path and query as received
            target = target[len(f"{split.scheme}://{split.netloc}"):] or "/"
        raw_path = target.split("?", 1)[0]
        match = MODEL_RE.match(raw_path)
        host = self.headers.get("Host")
        entry = {
            "method": self.command,
            "path": target,
            "model_id": urllib.parse.unquote(match.group(1)) if match else None,
            "verified": False,
            "reason": None,
            "access_key_id": None,
            "signed_headers": None,
            "scope_region": None,
            "scope_service": None,
            "host": host,
            "host_has_port": bool(host) and re.search(r":\d+$", host) is not None,
            "content_length_header": self.headers.get("Content-Length"),
            "transfer_encoding": self.headers.get("Transfer-Encoding"),
            "body_len": None,
            "status": None,
        }
        self.entry = entry
        self.logged = False
        try:
            try:
                body = self._read_body()
            except (BadRequest, ValueError) as e:
                self.close_connection = True
                raise Rejected(400, "ValidationException", f"bad request body: {e}")
            entry["body_len"] = len(body)
            try:
                entry.update(verify(cfg, self.command, target, self.headers, body))
            except Rejected as e:
                # keep what could be parsed out of the Authorization header for the log
                m = AUTH_RE.match((self.headers.get("Authorization") or "").strip())
                if m:
                    cred = m.group(1).split("/")
                    entry["access_key_id"] = cred[0]
                    entry["signed_headers"] = m.group(2).split(";")
                    if len(cred) == 5:
                        entry["scope_region"], entry["scope_service"] = cred[2], cred[3]
                raise
            entry["verified"] = True
            if self.command == "POST" and match and match.group(2) == "converse":
                status, payload = 200, CONVERSE_RESPONSE
            elif self.command == "POST" and match and match.group(2) == "invoke":
                status, payload = 200, INVOKE_RESPONSE
            else:
                status, payload = 404, {"message": f"Unknown operation {self.command} {raw_path}"}
            self._send(status, payload)
        except Rejected as e:
            entry["reason"] = e.message
            self._send(e.status, {"message": e.message}, [("x-amzn-ErrorType", f"{e.error_type}:http://internal.amazon.com/coral/com.amazon.coral.service/")])
        except Exception as e:  # never take the server down
            entry["reason"] = f"internal error: {type(e).__name__}: {e}"
            entry["status"] = 500
            self.close_connection = True
            try:
                self._send(500, {"message": entry["reason"]})
            except Exception:
                pass
        finally:
            self._log_once()

    def _log_once(self):
        if not self.logged:
            self.logged = True
            self.server.write_log(self.entry)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, cfg, ssl_context):
        self.cfg, self.ssl_context = cfg, ssl_context
        self.log_lock = threading.Lock()
        self.log_file = open(cfg.log, "a", encoding="utf-8") if cfg.log else None
        super().__init__((cfg.host, cfg.port), Handler)

    def finish_request(self, request, client_address):
        # the TLS handshake runs here, in the connection's own thread, so a slow or broken
        # client can't stall accept()
        request.settimeout(30)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            if not self.cfg.quiet:
                sys.stderr.write(f"bedrock_fake: TLS handshake with {client_address} failed: {e}\n")
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):
        if not self.cfg.quiet:
            sys.stderr.write(f"bedrock_fake: connection {client_address}: {sys.exc_info()[1]!r}\n")

    def write_log(self, entry):
        if self.log_file is None:
            return
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self.log_lock:
            self.log_file.write(line)
            self.log_file.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cert", required=True, help="PEM TLS server certificate (chain)")
    parser.add_argument("--key", required=True, help="PEM private key of --cert")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on, 0 picks a free one")
    parser.add_argument("--port-file", help="write the bound port here once listening (atomically)")
    parser.add_argument("--access-key-id", required=True)
    parser.add_argument("--secret-access-key", required=True)
    parser.add_argument("--session-token", default=None)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--service", default="bedrock", help="SigV4 signing name (default bedrock)")
    parser.add_argument("--log", help="append one JSON object per request to this file")
    parser.add_argument("--max-skew-seconds", type=int, default=900, help="reject x-amz-date further than this from now (0: no check)")
    parser.add_argument("--debug-canonical", action="store_true", help="print our canonical request to stderr on a mismatch")
    parser.add_argument("--quiet", action="store_true", help="no access log on stderr")
    cfg = parser.parse_args()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cfg.cert, cfg.key)
    ctx.set_alpn_protocols(["http/1.1"])
    server = Server(cfg, ctx)
    port = server.server_address[1]
    if cfg.port_file:
        tmp = f"{cfg.port_file}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, cfg.port_file)
    sys.stderr.write(f"bedrock_fake: listening on https://{cfg.host}:{port} (region {cfg.region}, service {cfg.service})\n")
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
