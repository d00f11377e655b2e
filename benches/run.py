#!/usr/bin/env python3
"""token-proxy benchmark: token-proxy against direct access, nginx, HAProxy, Caddy and Pingora.

One command (`python3 benches/run.py`) builds the release binary (and, on first use, the
Pingora peer in benches/pingora), starts one shared upstream
(nginx, 1 worker: plain http, and unless `--upstreams http` also HTTPS, HTTP/1.1 only and
offering h2, with a certificate from a private CA every proxy verifies) and every proxy on
127.0.0.1 only, runs the loads in alternating rounds (A B A B) and writes the results to
target/bench/ (results.json, results.md, chart.png, and every configuration it used). Everything it starts is stopped again, also on Ctrl-C or failure.

Python 3.11 standard library only. See benches/README.md and the Performance section of the
top-level README.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = ["direct", "token-proxy", "nginx", "haproxy", "caddy", "pingora"]
PROXIES = CASES[1:]
TOKEN = "bench-token"
BLOB_SIZE = 256 * 1024 * 1024
IDLE_CONNS = 1000
WRK_CONNS = 64
# The interleaved comparisons alternate their load between two processes in slices this long.
SLICE_S = 1
H2_STREAMS = 10
# The kinds of upstream the small-GET loads run against (--upstreams). `http`: the plain-http
# upstream every other load uses. `https`: the same nginx over TLS, HTTP/1.1 only (its ALPN
# offers http/1.1 alone), the production shape of an API. `h2tls`: a second TLS port that also
# offers h2 by ALPN, so a peer that can speak HTTP/2 to an upstream does.
UPSTREAMS = ["http", "https", "h2tls"]
UPSTREAM_TITLE = {
    "http": "plain http upstream",
    "https": "HTTPS upstream (TLS, HTTP/1.1 only)",
    "h2tls": "HTTPS upstream offering h2 (ALPN h2 and http/1.1)",
}
# The name the upstream's certificate is for, and that every peer verifies.
TLS_NAME = "localhost"
CLK_TCK = os.sysconf("SC_CLK_TCK")
APT_LINE = ["wrk", "nghttp2-client", "nginx-light", "haproxy", "caddy", "gnuplot-nox", "cmake"]
# tool -> Debian package
TOOL_PACKAGE = {
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "gnuplot": "gnuplot-nox",
    "curl": "curl",
    "openssl": "openssl",
    "cmake": "cmake",  # to build the Pingora peer (zlib-ng, a build dependency of pingora-core)
}
# The Pingora peer: a small Cargo project of its own (its own Cargo.lock, not a dependency of
# token-proxy), built on first use into its own target directory.
PINGORA_DIR = REPO / "benches" / "pingora"
PINGORA_TARGET = REPO / "target" / "bench-pingora"
PINGORA_BIN = PINGORA_TARGET / "release" / "pingora-peer"
# Concurrent streams per upstream h2 connection for Pingora (its default is 1, which would open
# one h2 connection per request in flight): nginx's default http2_max_concurrent_streams, the
# upstream's own limit, so Pingora multiplexes as far as the upstream lets it, as HAProxy, Caddy
# and token-proxy do.
PINGORA_H2_STREAMS = 128


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Everything this script starts: processes (each in its own process group), the ports they
# listen on, and temporary files. Cleaned up at exit, on SIGINT/SIGTERM and on failure.
# ---------------------------------------------------------------------------------------------


class Registry:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.ports: set[int] = set()
        self.temp_paths: list[Path] = []
        self.cleaned = False

    def spawn(self, argv: list[str], *, log_path: Path | None = None, env: dict | None = None,
              capture: bool = False, cpus: set[int] | None = None) -> subprocess.Popen:
        if capture:
            out, err = subprocess.PIPE, subprocess.PIPE
        elif log_path is not None:
            fh = open(log_path, "ab")
            out, err = fh, fh
        else:
            out, err = subprocess.DEVNULL, subprocess.DEVNULL
        # `cpus`: the child (and everything it forks or spawns) runs on these CPUs only;
        # without it, it inherits the harness's own CPU set (see Placement).
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True, preexec_fn=pin)
        if log_path is not None and not capture:
            fh.close()
        self.procs.append(p)
        return p

    def run(self, argv: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, str]:
        """Runs a client tool (wrk, h2load, curl) as a tracked process; returns rc, out, err."""
        p = self.spawn(argv, env=env, capture=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise RuntimeError(f"{argv[0]} did not finish within {timeout:.0f} s")
        self.forget(p)
        return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def forget(self, p: subprocess.Popen) -> None:
        if p in self.procs:
            self.procs.remove(p)

    def stop(self, p: subprocess.Popen, timeout: float = 10.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        # Workers of a process group (nginx) may outlive the leader for a moment.
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            pass
        else:
            deadline = time.time() + 3
            while time.time() < deadline:
                try:
                    os.killpg(p.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()
        self.forget(p)

    def cleanup(self) -> None:
        if self.cleaned:
            return
        self.cleaned = True
        for p in reversed(list(self.procs)):
            try:
                self.stop(p, timeout=5)
            except Exception as e:  # keep going: stop the rest
                print(f"warning: could not stop pid {p.pid}: {e}", file=sys.stderr)
        for path in self.temp_paths:
            try:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
            except OSError:
                pass
        left = listening_ports() & self.ports
        if left:
            print(f"warning: ports still listening after cleanup: {sorted(left)}", file=sys.stderr)


REG = Registry()


def on_signal(signum, _frame):
    # Raise SystemExit so that `finally` blocks and the atexit cleanup run; a second signal
    # during the cleanup is ignored.
    signal.signal(signum, signal.SIG_IGN)
    print(f"\ninterrupted by {signal.Signals(signum).name}: stopping everything started",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 3 and f[3] == "0A":  # TCP_LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def free_port() -> int:
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in REG.ports:
            REG.ports.add(port)
            return port


# ---------------------------------------------------------------------------------------------
# /proc: CPU time and memory of a process and its descendants
# ---------------------------------------------------------------------------------------------


def proc_tree(root: int) -> list[int]:
    """The root pid and all its descendants (nginx master and workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of each process (all its threads), summed."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


def mem_kib(pids: list[int], key: str) -> int:
    """Sum of VmRSS or VmHWM (KiB) over the processes."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def load_name(base: str, kind: str) -> str:
    """The load's name in the results for an upstream kind: `h1` for the plain upstream (the
    name every earlier result used), `h1-https`, `h1-h2tls` for the others."""
    return base if kind == "http" else f"{base}-{kind}"


# ---------------------------------------------------------------------------------------------
# TLS material for the HTTPS upstream: a private CA and a server certificate for localhost,
# made with openssl once per run in OUT/tls. Every peer trusts this CA and nothing else is
# needed: verification stays on everywhere, as it must against a real API.
# ---------------------------------------------------------------------------------------------


def openssl(*argv: str) -> None:
    r = subprocess.run(["openssl", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {argv[0]} failed: {(r.stderr + r.stdout).strip()[-400:]}")


def make_tls(out: Path) -> dict:
    """Makes OUT/tls/ca.pem (the CA), server.pem and server.key (for DNS:localhost and
    IP:127.0.0.1, signed by the CA) and returns their paths.

    Choices: ECDSA P-256 keys, which every peer's TLS library supports, for the CA and the
    server (handshakes are rare in these loads: every peer keeps its upstream connections).
    The CA is a proper v3 CA (basicConstraints CA:TRUE, keyCertSign) and the server
    certificate a proper leaf (CA:FALSE, serverAuth, subjectAltName), because rustls (through
    webpki) refuses certificates that are not, where OpenSSL-based peers might accept them. Both
    are valid for 2 days only, and the CA's key is deleted as soon as it has signed the server
    certificate: nothing else can ever be signed by this CA.
    """
    d = out / "tls"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    ca_key, ca, key, csr, cert = (d / "ca.key", d / "ca.pem", d / "server.key",
                                  d / "server.csr", d / "server.pem")
    ext = d / "server-ext.cnf"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", "-new", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", "/CN=token-proxy benchmark CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash")
    openssl("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={TLS_NAME}")
    ext.write_text(f"""\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:{TLS_NAME}, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
""")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-set_serial", str(secrets.randbits(63)), "-days", "2", "-extfile", str(ext),
            "-out", str(cert))
    ca_key.unlink()
    csr.unlink()
    openssl("verify", "-CAfile", str(ca), "-verify_hostname", TLS_NAME, str(cert))
    for f in (ca, cert, key):
        f.chmod(0o644 if f != key else 0o600)
    return {"dir": d, "ca": ca, "cert": cert, "key": key}


def tls_fetch(port: int, path: str, ca: Path, alpn: list[str] | None = None,
              timeout: float = 2.0) -> tuple[int, bytes, str | None]:
    """GET path over TLS from 127.0.0.1:port, verifying the certificate for `localhost` against
    the harness's CA (Python's own verifier: a fourth opinion on the certificates, besides
    OpenSSL's, rustls' and Go's). Returns the status, the body and the ALPN protocol chosen.
    Offers `alpn` if given; the request itself is always HTTP/1.1."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with ctx.wrap_socket(raw, server_hostname=TLS_NAME) as s:
        chosen = s.selected_alpn_protocol()
        if chosen not in (None, "http/1.1"):
            return 0, b"", chosen  # the server chose h2: nothing more to ask in HTTP/1.1
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {TLS_NAME}\r\nConnection: close\r\n\r\n".encode())
        status, body = read_close_delimited(s)
        return status, body, chosen


# ---------------------------------------------------------------------------------------------
# Configurations: written once per worker count into OUT/configs and kept for reading.
# ---------------------------------------------------------------------------------------------


def nginx_common(prefix: Path) -> str:
    # The Debian binary has absolute temp paths compiled in (/var/lib/nginx); keep each instance
    # inside its own prefix directory under the out dir.
    for d in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
        REG.temp_paths.append(prefix / d)
    return f"""\
  client_body_temp_path {prefix}/client_body_temp;
  proxy_temp_path       {prefix}/proxy_temp;
  fastcgi_temp_path     {prefix}/fastcgi_temp;
  uwsgi_temp_path       {prefix}/uwsgi_temp;
  scgi_temp_path        {prefix}/scgi_temp;
"""


def upstream_tls_block(ports: dict, tls: dict | None) -> str:
    """The upstream's TLS listeners (for the `https` and `h2tls` kinds), or nothing when no TLS
    kind is selected."""
    if tls is None:
        return ""
    return f"""
    # HTTPS, HTTP/1.1 only (ALPN: http/1.1): the `https` upstream kind.
    listen 127.0.0.1:{ports["https"]} ssl;
    # HTTPS with HTTP/2 (ALPN: h2, then http/1.1): the `h2tls` upstream kind. nginx 1.22 turns
    # HTTP/2 on per address:port, so this must be a port of its own.
    listen 127.0.0.1:{ports["h2tls"]} ssl http2;
    # A certificate for DNS:localhost and IP:127.0.0.1 from the harness's private CA
    # ({tls["ca"]}), which every peer is configured to verify.
    ssl_certificate     {tls["cert"]};
    ssl_certificate_key {tls["key"]};
    # TLS 1.2 and 1.3, as an API's front end offers them. nginx 1.22's default is TLSv1 TLSv1.1
    # TLSv1.2 (1.3 joined the default in 1.23.4): without this line every client would get 1.2.
    ssl_protocols TLSv1.2 TLSv1.3;
    # Otherwise nginx's defaults: the client's cipher preference, session tickets on. GET /proto
    # shows what each peer negotiated. keepalive_requests and keepalive_timeout above hold for
    # HTTP/2 connections too (nginx >= 1.19.7).
"""


def write_upstream_conf(out: Path, ports: dict, blob: Path,
                        tls: dict | None) -> tuple[Path, Path]:
    h1, h2 = ports["http"], ports["h2c"]
    prefix = out / "run" / "upstream-nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = out / "configs" / "upstream-nginx.conf"
    conf.write_text(f"""\
# The upstream shared by every case: nginx with 1 worker, answering from memory.
# Not a peer: its CPU is recorded in results.json but it is not what is compared.
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
lock_file {prefix}/nginx.lock;

events {{
  worker_connections 4096;
}}

http {{
  access_log off;
{nginx_common(prefix)}
  sendfile on;
  tcp_nopush on;
  # No connection churn from the upstream side: keep-alive connections are reused without a
  # request limit, for direct clients and for every proxy alike.
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  log_format tokens '$msec $request_uri $status';
  log_format upload '$msec $request_uri $status $request_length';

  server {{
    listen 127.0.0.1:{h1} default_server;
    # h2c (prior knowledge) for the direct HTTP/2 baseline; nginx 1.22 serves only HTTP/2 on an
    # `http2` listener without TLS, hence the second port.
    listen 127.0.0.1:{h2} http2;
{upstream_tls_block(ports, tls)}
    # Small GETs.
    location / {{
      default_type text/plain;
      return 200 "hello\\n";
    }}

    # What this upstream saw of the connection a request came on: the HTTP version, and the TLS
    # version and cipher (empty over plain http). The harness asks once through each peer and
    # upstream kind, so the tables say which peers really spoke h2 to the upstream.
    location = /proto {{
      default_type text/plain;
      return 200 "$server_protocol $ssl_protocol $ssl_cipher\\n";
    }}

    # 256 MiB download (a file created once under the out dir, read from the page cache).
    location = /blob {{
      alias {blob};
      default_type application/octet-stream;
    }}

    # 256 MiB upload. nginx answers only after it has read the whole body: `return 200` alone
    # would answer at once and discard the body in the background, and a proxy that sees the
    # answer before it has sent the body may stop the upload (Caddy does). So the body is read
    # into memory (no disk) by the proxy module, which then asks /uploaded on this same server,
    # without the body, for the answer. The access log's $request_length lets the harness check
    # that the whole body arrived through each proxy.
    location = /upload {{
      client_max_body_size 0;
      client_body_buffer_size 300m;
      proxy_pass http://127.0.0.1:{h1}/uploaded;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      access_log {prefix}/upload.log upload;
    }}
    location = /uploaded {{
      default_type text/plain;
      return 200 "ok\\n";
    }}

    # Token endpoint for token-proxy's credential (logged, to count token requests).
    location = /oauth2/token {{
      access_log {prefix}/tokens.log tokens;
      default_type application/json;
      return 200 '{{"token_type":"Bearer","expires_in":3600,"access_token":"{TOKEN}"}}';
    }}
    # 2-second tokens, for the refresh-under-load case.
    location = /oauth2/token-2s {{
      access_log {prefix}/tokens.log tokens;
      default_type application/json;
      return 200 '{{"token_type":"Bearer","expires_in":2,"access_token":"{TOKEN}"}}';
    }}
  }}
}}
""")
    return conf, prefix


def nginx_peer_upstream(kind: str, up: int, tls: dict | None) -> tuple[str, str]:
    """The `upstream` block and the proxy_* lines of the nginx peer for an upstream kind."""
    if kind == "http":
        return f"""\
  upstream up {{
    server 127.0.0.1:{up};
    keepalive 64;                  # reuse upstream connections, as the other peers do
    keepalive_requests 1000000;    # ... without a request limit
  }}
""", """\
      proxy_pass http://up;
      proxy_http_version 1.1;      # needed for upstream keep-alive
      proxy_set_header Connection "";
"""
    h2_note = ("""\
      # This upstream offers h2, but nginx 1.22's proxy_pass speaks HTTP/1.x only (the
      # `proxy_http_version` values are 1.0 and 1.1): nginx talks HTTP/1.1 to it, over TLS.
""" if kind == "h2tls" else "")
    return f"""\
  # Dialled by address; the name verified is proxy_ssl_name's, below.
  upstream upstream_tls {{
    server 127.0.0.1:{up};
    keepalive 64;                  # reuse upstream connections, as the other peers do
    keepalive_requests 1000000;    # ... without a request limit
  }}
""", f"""\
      proxy_pass https://upstream_tls;
{h2_note}      proxy_http_version 1.1;      # needed for upstream keep-alive
      proxy_set_header Connection "";
      # Verification on, against the harness's CA, for the name localhost (by default nginx
      # verifies nothing, and would check the upstream block's name).
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {tls["ca"]};
      proxy_ssl_name {TLS_NAME};
      proxy_ssl_server_name on;    # send SNI, as every other peer does
      proxy_ssl_session_reuse on;  # the default, written out: resume sessions on new connections
      # nginx 1.22's default is TLSv1 TLSv1.1 TLSv1.2 (1.3 joined the default in 1.23.4); every
      # other peer uses TLS 1.3 with this upstream, so nginx may too.
      proxy_ssl_protocols TLSv1.2 TLSv1.3;
"""


def write_nginx_peer_conf(out: Path, w: int, h1: int, h2: int | None, up: int, kind: str,
                          tls: dict | None) -> tuple[Path, Path]:
    tag = load_name(f"nginx-w{w}", kind)
    prefix = out / "run" / tag
    prefix.mkdir(parents=True, exist_ok=True)
    conf = out / "configs" / f"{tag}.conf"
    upstream_block, proxy_lines = nginx_peer_upstream(kind, up, tls)
    if h2 is not None:
        listen = f"""\
    listen 127.0.0.1:{h1};
    # h2c (prior knowledge): nginx 1.22 serves only HTTP/2 on a plaintext `http2` listener, so
    # it gets its own port.
    listen 127.0.0.1:{h2} http2;
"""
    else:
        listen = f"""\
    # Clients speak HTTP/1.1 to the proxy; the HTTP/2 client load runs on the plain upstream
    # only, so this configuration has no h2c port.
    listen 127.0.0.1:{h1};
"""
    conf.write_text(f"""\
# nginx as a reverse proxy that sets the same static Authorization header, to the
# {UPSTREAM_TITLE[kind]}.
# Defaults are kept except where fairness needs a change; each change is commented.
daemon off;
master_process on;
worker_processes {w};             # = token-proxy's `workers`
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
lock_file {prefix}/nginx.lock;

events {{
  # Default 512 is too few for the 1,000 idle connections case (plus upstream connections);
  # sized like HAProxy's maxconn below. nginx preallocates these, which counts in its RSS.
  worker_connections 2048;
}}

http {{
  access_log off;                  # no peer logs requests
{nginx_common(prefix)}
  # Client side: no request limit per keep-alive connection (the default, 1000, would make
  # wrk reconnect every 1000 requests; token-proxy, HAProxy and Caddy have no such limit).
  keepalive_requests 1000000;
  # Uploads: no size limit (the default is 1 MiB). Left at the defaults: the request body is
  # spooled to client_body_temp (disk) before it is forwarded (proxy_request_buffering on), and
  # the response is buffered (proxy_buffering on, to disk up to proxy_max_temp_file_size 1 GiB
  # when the client reads slower than the upstream sends).
  client_max_body_size 0;

{upstream_block}
  server {{
{listen}
    location / {{
{proxy_lines}      proxy_set_header Authorization "Bearer {TOKEN}";
    }}
  }}
}}
""")
    return conf, prefix


def write_haproxy_conf(out: Path, w: int, h1: int, up: int, kind: str,
                       tls: dict | None) -> Path:
    conf = out / "configs" / f"{load_name(f'haproxy-w{w}', kind)}.cfg"
    if kind == "http":
        server = f"server up 127.0.0.1:{up}"
    else:
        server = f"""\
  # TLS to the upstream, verified (`verify required`) against the harness's CA only, for the
  # name localhost: the SNI sent is also the name checked against the certificate. ALPN offers
  # h2 and http/1.1, as token-proxy and Caddy do, and the upstream picks: h2 on the h2tls
  # port, HTTP/1.1 on the https port. Dialled by address (no resolver). TLS session reuse
  # is on by default (ssl-reuse).
  server up 127.0.0.1:{up} ssl verify required ca-file {tls['ca']} sni str({TLS_NAME}) alpn h2,http/1.1"""
    conf.write_text(f"""\
# HAProxy as a reverse proxy that sets the same static Authorization header, to the
# {UPSTREAM_TITLE[kind]}.
# Runs in the foreground (-db), one process with `nbthread` threads. No logging.
global
  nbthread {w}                     # = token-proxy's `workers`
  maxconn 2048                     # enough for the 1,000 idle connections case, like nginx

defaults
  mode http
  option http-keep-alive
  timeout connect 10s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s

frontend bench
  # HAProxy detects the HTTP/2 preface on a plaintext bind, so h2c (prior knowledge) and
  # HTTP/1.1 share this port, as with token-proxy.
  bind 127.0.0.1:{h1}
  http-request set-header Authorization "Bearer {TOKEN}"
  default_backend upstream

backend upstream
  http-reuse always                # share idle upstream connections between clients
{server if kind != "http" else "  " + server}
""")
    return conf


def write_caddy_conf(out: Path, w: int, h1: int, up: int, kind: str, tls: dict | None) -> Path:
    conf = out / "configs" / f"{load_name(f'caddy-w{w}', kind)}.Caddyfile"
    if kind == "http":
        target, tls_lines = f"127.0.0.1:{up}", ""
    else:
        target = f"https://127.0.0.1:{up}"
        tls_lines = f"""\
			# https:// above turns TLS on, dialled by address. Verified (Caddy always verifies
			# unless told not to) against the harness's CA only, for the name localhost.
			tls_trusted_ca_certs {tls["ca"]}
			tls_server_name {TLS_NAME}
			# `versions` left at its default, "1.1 2": ALPN offers h2 and http/1.1 and the
			# upstream picks, so Caddy speaks h2 where the upstream offers it, as token-proxy
			# and HAProxy do.
"""
    conf.write_text(f"""\
# Caddy as a reverse proxy that sets the same static Authorization header, to the
# {UPSTREAM_TITLE[kind]}.
# Started with GOMAXPROCS={w} (= token-proxy's `workers`). No access log (Caddy logs requests
# only with a `log` directive). Its own data and autosave files go under the out dir.
{{
	admin off
	auto_https off
	servers {{
		# h1 and cleartext HTTP/2 (prior knowledge) on the same port.
		protocols h1 h2c
	}}
}}

http://:{h1} {{
	bind 127.0.0.1
	reverse_proxy {target} {{
		header_up Authorization "Bearer {TOKEN}"
		transport http {{
{tls_lines}			# Keep as many idle upstream connections as nginx's `keepalive 64` (default 32).
			keepalive_idle_conns_per_host 64
		}}
	}}
}}
""")
    return conf


def write_pingora_conf(out: Path, w: int, h1: int, up: int, kind: str,
                       tls: dict | None) -> Path:
    """The Pingora peer's one file: Pingora's own ServerConf keys, and the `peer:` section that
    benches/pingora/src/main.rs reads (listen, upstream, TLS, the header)."""
    tag = load_name(f"pingora-w{w}", kind)
    conf = out / "configs" / f"{tag}.yaml"
    run = out / "run" / tag
    run.mkdir(parents=True, exist_ok=True)
    if kind == "http":
        tls_server, tls_peer = "", """\
  tls: false
"""
    else:
        tls_server = f"""\
# The roots the upstream's certificate is verified against: the harness's CA only (with
# ca_file set, Pingora's rustls connector loads it instead of the system's roots).
ca_file: {tls["ca"]}
"""
        tls_peer = f"""\
  # TLS to the upstream, dialled by address. Verification is Pingora's default and stays on
  # (verify_cert and verify_hostname), for the name sent as SNI.
  tls: true
  sni: {TLS_NAME}
  # ALPN offers h2 and http/1.1 (ALPN::H2H1), as token-proxy, HAProxy and Caddy do, and the
  # upstream picks: h2 on the h2tls port, HTTP/1.1 on the https port. Pingora's default
  # offers http/1.1 only. TLS session resumption: rustls' default client session cache.
  offer_h2: true
  # Streams per upstream h2 connection: Pingora's default is 1 (one h2 connection per request
  # in flight); {PINGORA_H2_STREAMS} is nginx's http2_max_concurrent_streams, the upstream's
  # own limit, so Pingora multiplexes as far as the upstream allows, as the other h2 peers do.
  max_h2_streams: {PINGORA_H2_STREAMS}
"""
    conf.write_text(f"""\
# Pingora (pingora-proxy 0.9, the project in benches/pingora) as a reverse proxy that sets the
# same static Authorization header, to the {UPSTREAM_TITLE[kind]}.
# The top-level keys are Pingora's own ServerConf, at their defaults except where commented;
# `peer:` is read by benches/pingora/src/main.rs. No access log: the proxy's logging phase is
# empty, and only warnings and errors go to stderr.
version: 1
# = token-proxy's `workers`: one tokio runtime of this many threads for the proxy service
# (work stealing on, Pingora's default).
threads: {w}
# Upstream keep-alive: Pingora pools upstream connections by default; the pool holds this many
# idle connections per thread (default 128), sized like nginx's `keepalive 64` per worker.
upstream_keepalive_pool_size: 64
# Used only when daemonized or upgrading; kept inside the out dir all the same.
pid_file: {run}/pingora.pid
upgrade_sock: {run}/upgrade.sock
# SIGTERM, as the harness stops every peer: no grace period (the default waits 5 minutes
# before it stops), then at most 1 s for the runtime to finish.
grace_period_seconds: 0
graceful_shutdown_timeout_seconds: 1
{tls_server}
peer:
  # Clients speak plain HTTP/1.1 here, and h2c with prior knowledge on the same port (Pingora
  # peeks for the HTTP/2 preface), as with token-proxy, HAProxy and Caddy.
  listen: 127.0.0.1:{h1}
  h2c: true
  upstream: 127.0.0.1:{up}
{tls_peer}  # Set on every forwarded request, replacing any the client sent.
  authorization: "Bearer {TOKEN}"
""")
    return conf


def write_token_proxy_conf(out: Path, w: int, h1: int, up: int, token_path: str,
                           tag: str, kind: str = "http", up_tls: int | None = None,
                           tls: dict | None = None) -> Path:
    conf = out / "configs" / f"{load_name(f'{tag}-w{w}', kind)}.toml"
    lifetime = "2 s" if token_path.endswith("-2s") else "3600 s"
    if kind == "http":
        upstream = f'upstream = "http://127.0.0.1:{up}"\n'
    else:
        upstream = f"""\
# HTTPS, verified (token-proxy always verifies) for the name localhost against its built-in
# roots plus the harness's CA. ALPN offers h2 and http/1.1, so token-proxy speaks h2 where the
# upstream offers it, as HAProxy and Caddy do.
upstream = "https://{TLS_NAME}:{up_tls}"
ca_file = "{tls["ca"]}"
"""
    conf.write_text(f"""\
# token-proxy: one credential on the upstream's token endpoint ({lifetime} tokens), one route to
# the {UPSTREAM_TITLE[kind]}, no admin listener, no access log (as every peer runs with
# `access_log off`). Everything else at its default. The token endpoint is on the plain-http
# port for every upstream kind: the small-GET loads measure requests, not token fetches.
workers = {w}
access_log = false

[credentials.bench]
token_url = "http://127.0.0.1:{up}{token_path}"
client_id = "bench"
client_secret = "bench-secret"

[[routes]]
listen = "127.0.0.1:{h1}"
{upstream}credential = "bench"
""")
    return conf


# ---------------------------------------------------------------------------------------------
# Running servers
# ---------------------------------------------------------------------------------------------


class Placement:
    """Which CPUs the server side (the proxy under test and the upstream) runs on, and which the
    client side (the load generator).

    On a machine with few cores, wrk, the upstream and the proxy compete for CPU, and where the
    scheduler happens to put them moves a run by up to ±15 % (nginx's own 1-worker figure
    measured 67k and 53k req/s in two rounds of one run). So the harness places them as if on
    two machines: with `workers` w on n usable CPUs and w < n, the server side gets the last w
    CPUs and the client side (wrk, h2load, curl, the harness's own clients) the others. The
    client side must never be the bottleneck, or every proxy measures the load generator: wrk
    alone on a CPU keeps up, while wrk and the upstream together on one CPU do not (they cap
    the run at about the 1-worker rate of the fastest proxies). With w >= n nothing is pinned:
    everything shares all CPUs. The same rule holds for every case, direct included;
    `--no-pin` turns it off.
    """

    def __init__(self, workers: int, pin: bool):
        self.all = ALL_CPUS
        if pin and workers < len(self.all):
            self.server: set[int] | None = set(self.all[-workers:])
            self.client: set[int] = set(self.all[:-workers])
        else:
            self.server, self.client = None, set(self.all)

    def describe(self) -> str:
        if self.server is None:
            return f"not pinned (all of CPUs {fmt_cpus(self.all)})"
        return (f"proxy and upstream on CPU {fmt_cpus(self.server)}, load generator on CPU "
                f"{fmt_cpus(self.client)}")

    def enter(self, upstream: "Server") -> None:
        """Moves the harness (so the clients it starts) and the upstream onto their CPUs."""
        os.sched_setaffinity(0, self.client)
        for pid in upstream.pids():
            try:
                os.sched_setaffinity(pid, self.server or set(self.all))
            except OSError:  # gone, or not ours to move
                pass


# The CPUs the harness may use, read before it pins itself.
ALL_CPUS = sorted(os.sched_getaffinity(0))


def fmt_cpus(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))


class Server:
    """One started peer (or the upstream). `pids()` lists the processes to measure."""

    def __init__(self, name: str, proc: subprocess.Popen | None, h1: int, h2: int | None,
                 log_path: Path | None, url: str | None = None):
        self.name, self.proc, self.h1, self.h2, self.log_path = name, proc, h1, h2, log_path
        # Where the HTTP/1.1 load goes: the peer's plain port, or for direct to an HTTPS
        # upstream, that upstream itself (then wrk does the TLS).
        self.url = url or f"http://127.0.0.1:{h1}"

    def pids(self) -> list[int]:
        return proc_tree(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc:
            REG.stop(self.proc)
            self.proc = None


def http_fetch(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET path from 127.0.0.1:port with `Connection: close`; returns the status and the body."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return read_close_delimited(s)
    finally:
        s.close()


def read_close_delimited(s) -> tuple[int, bytes]:
    """Reads the response to a `Connection: close` request until the server closes, and
    returns the status and the body (de-chunked: a proxy may re-frame a small body)."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ssl.SSLEOFError:  # closed without close_notify: the end all the same
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        return 0, b""
    if re.search(rb"(?im)^transfer-encoding:.*chunked", head):
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return int(head.split(b" ", 2)[1]), body


def wait_ready(server: Server, timeout: float = 20.0) -> None:
    """Waits until GET / through the server answers 200. A 4xx ends the wait at once: that is
    the proxy or the upstream refusing the request as sent (an HTTPS upstream rejecting what a
    proxy sends it, say), which waiting does not change; connection errors and 5xx (a proxy
    still starting, a token not yet fetched) are retried until `timeout`."""
    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        if server.proc and server.proc.poll() is not None:
            break
        try:
            status, body = http_fetch(server.h1, "/")
            if status == 200:
                return
            text = " ".join(re.sub(rb"<[^>]*>", b" ", body).decode(errors="replace").split())
            last = f"HTTP {status}" + (f": {text[:120]}" if text else "")
            if 400 <= status < 500:
                break
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    tail = ""
    if server.log_path and server.log_path.exists():
        tail = "\n".join(server.log_path.read_text(errors="replace").splitlines()[-15:])
    raise RuntimeError(f"{server.name} did not become ready on 127.0.0.1:{server.h1} "
                       f"({last})\n{tail}")


class Bench:
    def __init__(self, args, out: Path):
        self.args = args
        self.out = out
        self.binary: Path | None = None
        self.pingora: Path | None = None  # the Pingora peer's binary (build_pingora)
        self.upstream: Server | None = None
        self.ports: dict = {}
        self.confs: dict = {}
        self.raw: list[dict] = []
        self.errors: list[str] = []
        self.placement: Placement | None = None
        self.tls: dict | None = None  # the HTTPS upstream's CA and certificate (make_tls)
        self.up_ports: dict = {}      # upstream kind (and "h2c") -> the upstream's port
        self.upstream_alpn: dict | None = None

    def place(self, w: int) -> Placement:
        """Pins the harness, its clients and the upstream for the runs with `w` workers."""
        self.placement = Placement(w, not self.args.no_pin)
        self.placement.enter(self.upstream)
        return self.placement

    # -- setup ---------------------------------------------------------------------------------

    def setup(self, workers: list[int], cases: list[str], kinds: list[str]) -> None:
        (self.out / "configs").mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        REG.temp_paths.append(data)
        self.blob = data / "blob-256MiB"
        if not self.blob.exists() or self.blob.stat().st_size != BLOB_SIZE:
            chunk = bytes(range(256)) * 4096  # 1 MiB, not all zeros
            with open(self.blob, "wb") as f:
                for _ in range(BLOB_SIZE // len(chunk)):
                    f.write(chunk)
        self.blob.chmod(0o644)

        # The TLS listeners and their certificate exist only when a TLS kind is selected.
        self.tls = make_tls(self.out) if set(kinds) - {"http"} else None
        up = {"http": free_port(), "h2c": free_port()}
        if self.tls:
            up.update(https=free_port(), h2tls=free_port())
        self.up_ports = up
        conf, prefix = write_upstream_conf(self.out, up, self.blob, self.tls)
        self.upstream_prefix = prefix
        self.upstream = self.start_nginx("upstream", conf, prefix, up["http"], up["h2c"])
        if self.tls:
            self.upstream_alpn = self.check_upstream_tls()
        for w in workers:
            for case in cases:
                if case == "direct":
                    continue
                # The plain upstream's configuration always: the loads other than the small
                # GETs (h2c, idle, transfers, refresh) run on it whatever --upstreams says.
                for kind in [k for k in UPSTREAMS if k == "http" or k in kinds]:
                    self.write_peer(case, w, kind)
                if case == "token-proxy":
                    # The refresh load runs on the plain upstream only.
                    h1r = free_port()
                    self.confs[("token-proxy-2s", w, "http")] = (write_token_proxy_conf(
                        self.out, w, h1r, up["http"], "/oauth2/token-2s", "token-proxy-2s-token"),
                        None)
                    self.ports[("token-proxy-2s", w, "http")] = (h1r, h1r)

    def write_peer(self, case: str, w: int, kind: str) -> None:
        """Writes the case's configuration for `w` workers and the upstream kind, on new ports.
        Only the plain-upstream nginx gets an h2c port of its own (the HTTP/2 client load runs
        there only); the others share h1 and h2c on one port."""
        up, tls = self.up_ports[kind], self.tls
        h1 = free_port()
        h2 = h1
        if case == "nginx":
            h2 = free_port() if kind == "http" else None
            c, p = write_nginx_peer_conf(self.out, w, h1, h2, up, kind, tls)
            self.confs[(case, w, kind)] = (c, p)
        elif case == "haproxy":
            self.confs[(case, w, kind)] = (write_haproxy_conf(self.out, w, h1, up, kind, tls), None)
        elif case == "caddy":
            self.confs[(case, w, kind)] = (write_caddy_conf(self.out, w, h1, up, kind, tls), None)
        elif case == "pingora":
            self.confs[(case, w, kind)] = (write_pingora_conf(self.out, w, h1, up, kind, tls),
                                           None)
        elif case == "token-proxy":
            self.confs[(case, w, kind)] = (write_token_proxy_conf(
                self.out, w, h1, self.up_ports["http"], "/oauth2/token", "token-proxy", kind,
                up, tls), None)
        self.ports[(case, w, kind)] = (h1, h2)

    def check_upstream_tls(self) -> dict:
        """Checks the upstream's TLS ports before any case runs: the certificate verifies for
        localhost against the CA (with Python's verifier), the `https` port answers over
        HTTP/1.1 and chooses no h2 when offered it, and the `h2tls` port chooses h2. Returns
        the ALPN protocol each port chose when offered h2 and http/1.1."""
        chosen = {}
        for kind, want in (("https", "http/1.1"), ("h2tls", "h2")):
            port = self.up_ports[kind]
            status, body, _ = tls_fetch(port, "/", self.tls["ca"])
            if status != 200 or body != b"hello\n":
                raise RuntimeError(f"upstream {kind} port {port}: HTTP {status} {body[:60]!r}")
            _, _, alpn = tls_fetch(port, "/", self.tls["ca"], alpn=["h2", "http/1.1"])
            if alpn != want:
                raise RuntimeError(f"upstream {kind} port {port} chose ALPN {alpn}, not {want}")
            chosen[kind] = alpn
        return chosen

    def start_nginx(self, name: str, conf: Path, prefix: Path, h1: int, h2: int | None) -> Server:
        log_path = prefix / "stderr.log"
        proc = REG.spawn(["nginx", "-p", str(prefix), "-c", str(conf), "-e",
                          str(prefix / "error.log")], log_path=log_path, cpus=self.server_cpus())
        server = Server(name, proc, h1, h2, prefix / "error.log")
        self.ready(server)
        return server

    def ready(self, server: Server) -> None:
        """Waits for the server; if it never gets ready, stops it before raising, so that the
        next case that uses its ports (the interleaved run, say) finds them free."""
        try:
            wait_ready(server)
        except BaseException:
            server.stop()
            raise

    def server_cpus(self) -> set[int] | None:
        """The server side's CPUs now; None before the first placement, when the upstream
        starts (`Placement.enter` moves it)."""
        return self.placement.server if self.placement else None

    def start(self, case: str, w: int, kind: str = "http") -> Server:
        """Starts a fresh process for the case and upstream kind (direct: the shared upstream).

        direct to an HTTPS upstream sends wrk to it over TLS (to `localhost`, so SNI names the
        certificate's host; wrk verifies nothing): the client then pays for TLS, where behind
        a proxy it speaks plain HTTP/1.1, so that row is a different shape, not a limit."""
        if case == "direct":
            if kind == "http":
                return Server("direct", None, self.upstream.h1, self.upstream.h2, None)
            port = self.up_ports[kind]
            return Server(load_name("direct", kind), None, port, None, None,
                          url=f"https://{TLS_NAME}:{port}")
        conf, prefix = self.confs[(case, w, kind)]
        h1, h2 = self.ports[(case, w, kind)]
        name = load_name(f"{case}-w{w}", kind)
        if case == "nginx":
            return self.start_nginx(name, conf, prefix, h1, h2)
        log_path = self.out / "logs" / f"{name}.log"
        env = dict(os.environ)
        if case == "haproxy":
            argv = ["haproxy", "-db", "-f", str(conf)]
        elif case == "caddy":
            home = self.out / "run" / "caddy-home"
            if not home.exists():
                home.mkdir(parents=True)
                REG.temp_paths.append(home)  # Caddy's autosave.json and storage
            env.update(GOMAXPROCS=str(w), HOME=str(home), XDG_DATA_HOME=str(home / "data"),
                       XDG_CONFIG_HOME=str(home / "config"))
            argv = ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]
        elif case == "pingora":
            argv = [str(self.pingora), str(conf)]
        else:  # token-proxy, token-proxy-2s
            env["RUST_LOG"] = "info"
            argv = [str(self.binary), "run", "--config", str(conf)]
        proc = REG.spawn(argv, log_path=log_path, env=env, cpus=self.server_cpus())
        server = Server(name, proc, h1, h2, log_path)
        self.ready(server)
        return server

    # -- loads ---------------------------------------------------------------------------------

    def wrk(self, server: Server, duration: int, conns: int) -> dict:
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", server.url + "/"]
        rc, out, err = REG.run(argv, timeout=duration + 60)
        if rc != 0:
            raise RuntimeError(f"wrk exited {rc}: {(err + out).strip()[-300:]}")
        r = parse_wrk(out)
        r["raw_output"] = out
        return r

    def h2load(self, port: int, duration: int) -> dict:
        argv = ["h2load", "-t1", f"-c{WRK_CONNS}", f"-m{H2_STREAMS}", "-D", str(duration),
                f"http://127.0.0.1:{port}/"]
        rc, out, err = REG.run(argv, timeout=duration + 60)
        r = parse_h2load(out)
        if rc != 0 and r.get("requests") is None:
            raise RuntimeError(f"h2load exited {rc}: {err.strip()} {out.strip()[-300:]}")
        r["raw_output"] = out
        return r

    def measured(self, server: Server, fn):
        """Runs fn() and returns (result, proxy CPU seconds, upstream CPU seconds)."""
        pids, up_pids = server.pids(), self.upstream.pids()
        c0, u0 = cpu_seconds(pids), cpu_seconds(up_pids)
        result = fn()
        cpu = cpu_seconds(pids) - c0 if pids else None  # direct: no proxy process
        return result, cpu, cpu_seconds(up_pids) - u0

    def run_get(self, case: str, w: int, rnd: int, kind: str = "http") -> None:
        d = self.args.duration
        server = self.start(case, w, kind)
        try:
            time.sleep(0.3)
            pids = server.pids()
            idle_rss = mem_kib(pids, "VmRSS") if pids else None
            saw = self.upstream_saw(server, kind)
            self.wrk(server, 1, WRK_CONNS)  # warm-up: pools, caches, lazy allocations
            r, cpu, up_cpu = self.measured(server, lambda: self.wrk(server, d, WRK_CONNS))
            peak = mem_kib(pids, "VmHWM") if pids else None
            self.record(load_name("h1", kind), case, w, rnd, r, cpu=cpu, upstream_cpu=up_cpu,
                        rss_idle_kib=idle_rss, rss_peak_kib=peak, upstream=kind,
                        upstream_saw=saw)
            # Latency of one request at a time: the proxy's added latency over direct.
            d1 = max(2, d // 2)
            r1, cpu1, up1 = self.measured(server, lambda: self.wrk(server, d1, 1))
            self.record(load_name("h1c1", kind), case, w, rnd, r1, cpu=cpu1, upstream_cpu=up1,
                        upstream=kind)
        finally:
            server.stop()

    def upstream_saw(self, server: Server, kind: str) -> str:
        """What the upstream saw of a request through this server (GET /proto, once, before the
        load): the HTTP version and TLS cipher it arrived with, e.g. "HTTP/2.0 TLSv1.3
        TLS_AES_256_GCM_SHA384". This is how the tables know, rather than assume, which peers
        speak h2 to an upstream that offers it. direct over TLS asks with Python's client, which
        offers no ALPN, as wrk offers none."""
        if server.proc is None and kind != "http":
            status, body, _ = tls_fetch(server.h1, "/proto", self.tls["ca"])
        else:
            status, body = http_fetch(server.h1, "/proto")
        if status != 200:
            raise RuntimeError(f"{server.name}: GET /proto answered HTTP {status}")
        return " ".join(body.decode(errors="replace").split())

    def run_h2(self, case: str, w: int, rnd: int) -> None:
        d = self.args.duration
        server = self.start(case, w)
        try:
            time.sleep(0.3)
            pids = server.pids()
            idle_rss = mem_kib(pids, "VmRSS") if pids else None
            self.h2load(server.h2, 1)  # warm-up
            r, cpu, up_cpu = self.measured(server, lambda: self.h2load(server.h2, d))
            peak = mem_kib(pids, "VmHWM") if pids else None
            self.record("h2", case, w, rnd, r, cpu=cpu, upstream_cpu=up_cpu,
                        rss_idle_kib=idle_rss, rss_peak_kib=peak)
        finally:
            server.stop()

    def run_transfer(self, kind: str, case: str, w: int, rnd: int) -> None:
        server = self.start(case, w)
        try:
            time.sleep(0.3)
            pids = server.pids()
            before = mem_kib(pids, "VmRSS") if pids else None
            url = f"http://127.0.0.1:{server.h1}"
            fmt = "%{http_code} %{size_upload} %{size_download} %{time_total}"
            if kind == "upload":
                lines0 = count_lines(self.upstream_prefix / "upload.log")
                argv = ["curl", "-sS", "-o", "/dev/null", "-H", "Expect:", "-X", "POST",
                        "-T", str(self.blob), "-w", fmt, url + "/upload"]
            else:
                argv = ["curl", "-sS", "-o", "/dev/null", "-w", fmt, url + "/blob"]
            (rc, out, err), cpu, up_cpu = self.measured(
                server, lambda: REG.run(argv, timeout=600))
            peak = mem_kib(pids, "VmHWM") if pids else None
            errors = []
            parts = out.split()
            if rc != 0 or len(parts) != 4:
                errors.append(f"curl exited {rc}: {err.strip()}")
                code, up_b, down_b, secs = 0, 0, 0, float("nan")
            else:
                code, up_b, down_b, secs = int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3])
            if code != 200:
                errors.append(f"HTTP {code}")
            moved = up_b if kind == "upload" else down_b
            if moved != BLOB_SIZE:
                errors.append(f"{moved} bytes moved, expected {BLOB_SIZE}")
            if kind == "upload" and not errors:
                # The upstream logs how much of the body it read.
                time.sleep(0.2)
                got = last_upload_length(self.upstream_prefix / "upload.log", lines0)
                if got is None or got < BLOB_SIZE:
                    errors.append(f"upstream read {got} bytes of the upload")
            r = {
                "seconds": secs,
                "mb_s": BLOB_SIZE / 1e6 / secs if secs and secs == secs and secs > 0 else None,
                "errors": len(errors),
                "error_text": "; ".join(errors),
            }
            self.record(kind, case, w, rnd, r, cpu=cpu, upstream_cpu=up_cpu,
                        rss_idle_kib=before, rss_peak_kib=peak,
                        rss_increase_kib=(peak - before) if pids else None)
        finally:
            server.stop()

    def run_idle(self, case: str, w: int, rnd: int) -> None:
        server = self.start(case, w)
        conns: list[socket.socket] = []
        try:
            # A few GETs first, on connections closed again, so that what a proxy sets up once
            # (its upstream connection, a token, per-thread state on each worker) is not
            # counted as the idle connections' memory.
            for _ in range(2 * w):
                with socket.create_connection(("127.0.0.1", server.h1), timeout=10) as s:
                    read_response(s)
            time.sleep(0.3)
            pids = server.pids()
            before = mem_kib(pids, "VmRSS")
            failed = 0
            for _ in range(IDLE_CONNS):
                try:
                    s = socket.create_connection(("127.0.0.1", server.h1), timeout=10)
                    conns.append(s)
                    if read_response(s) != 200:
                        failed += 1
                except OSError:
                    failed += 1
            time.sleep(1.0)
            held = mem_kib(pids, "VmRSS")
            # Did the proxy keep every connection open?
            closed = 0
            for s in conns:
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        closed += 1
                except BlockingIOError:
                    pass
                except OSError:
                    closed += 1
            r = {"conns": IDLE_CONNS, "failed": failed, "closed_by_peer": closed,
                 "errors": failed + closed}
            self.record("idle", case, w, rnd, r, rss_idle_kib=before, rss_held_kib=held,
                        rss_increase_kib=held - before,
                        kib_per_conn=(held - before) / IDLE_CONNS)
        finally:
            for s in conns:
                s.close()
            server.stop()

    def interleave(self, servers: dict) -> dict:
        """Alternates the small-GET load between two running servers (name -> Server) in
        SLICE_S slices, A B B A, for `duration` groups: as many seconds of load for each as two
        GET runs. Returns, per name, the summed requests, time, errors and CPU, and the median
        of the slices' p99.

        Why slices: on a shared host, single 5 s runs drift by up to ±10 % from one to the
        next, so two runs made one after the other differ by that much whatever they measure.
        Drift slower than a slice falls on both alike: two identical token-proxy processes
        measured this way against each other agree within ±2 % over 12 s each.
        """
        a, b = servers
        total = {name: {"requests": 0, "elapsed_s": 0.0, "errors": 0, "cpu": 0.0,
                        "up_cpu": 0.0, "p99": []} for name in servers}
        for name in (a, b, b, a) * max(1, self.args.duration // SLICE_S):
            server = servers[name]
            r, cpu, up_cpu = self.measured(server, lambda: self.wrk(server, SLICE_S, WRK_CONNS))
            t = total[name]
            t["requests"] += r.get("requests") or 0
            t["elapsed_s"] += r.get("elapsed_s") or 0.0
            t["errors"] += r.get("errors", 0)
            t["cpu"] += cpu or 0.0
            t["up_cpu"] += up_cpu or 0.0
            if r.get("p99_ms") is not None:
                t["p99"].append(r["p99_ms"])
        return {name: {"requests": t["requests"], "elapsed_s": t["elapsed_s"],
                       "rps": t["requests"] / t["elapsed_s"] if t["elapsed_s"] else None,
                       "p99_ms": statistics.median(t["p99"]) if t["p99"] else None,
                       "errors": t["errors"], "cpu": t["cpu"], "up_cpu": t["up_cpu"]}
                for name, t in total.items()}

    def run_interleaved_get(self, w: int, rnd: int, kind: str = "http") -> None:
        """token-proxy and nginx side by side, both to the same upstream kind, the small-GET
        load alternating between them in 1 s slices (`interleave`): the sharpest measure of
        their req/s, p99 and CPU ratios, and the headline figure of the targets table."""
        servers: dict = {}
        try:
            for case in ("token-proxy", "nginx"):
                servers[case] = self.start(case, w, kind)
            for server in servers.values():
                self.wrk(server, 1, WRK_CONNS)  # warm-up
            for case, r in self.interleave(servers).items():
                cpu, up_cpu = r.pop("cpu"), r.pop("up_cpu")
                self.record(load_name("h1x", kind), case, w, rnd, r, cpu=cpu,
                            upstream_cpu=up_cpu, upstream=kind)
        finally:
            for server in servers.values():
                server.stop()

    def run_refresh(self, w: int, rnd: int) -> None:
        """token-proxy with 3600 s tokens and with 2 s tokens, running side by side, the GET
        load alternating between them in 1 s slices (`interleave`). Back-to-back 5 s pairs,
        which this used to run, spread from 0.88 to 1.11 here and could not resolve a 2 %
        target. The idle variant's own refreshes (about 90,000 instructions each, one per
        second) land in the other's slices, an effect far below the slices' resolution.
        """
        variants = ("3600s", "2s")
        servers: dict = {}
        try:
            for v in variants:
                servers[v] = self.start("token-proxy" if v == "3600s" else "token-proxy-2s", w)
            tokens_log = self.upstream_prefix / "tokens.log"
            for v in variants:
                self.wrk(servers[v], 1, WRK_CONNS)  # warm-up
            t0 = count_lines(tokens_log)
            logs0 = {v: servers[v].log_path.stat().st_size if servers[v].log_path.exists() else 0
                     for v in variants}
            results = self.interleave(servers)
            time.sleep(0.1)
            tokens = count_lines(tokens_log) - t0  # only the 2 s variant asks during the slices
            for v, r in results.items():
                with open(servers[v].log_path, "rb") as f:
                    f.seek(logs0[v])
                    new = f.read().decode(errors="replace")
                r["token_requests"] = tokens if v == "2s" else 0
                r["log_warnings"] = sum(1 for l in new.splitlines()
                                        if " WARN " in l or " ERROR " in l)
                cpu, up_cpu = r.pop("cpu"), r.pop("up_cpu")
                self.record("refresh", f"token-proxy ({v} tokens)", w, rnd, r, cpu=cpu,
                            upstream_cpu=up_cpu, variant=v)
        finally:
            for server in servers.values():
                server.stop()

    def record(self, load: str, case: str, w: int, rnd: int, r: dict, **extra) -> None:
        entry = {"load": load, "case": case, "workers": w, "round": rnd, "upstream": "http"}
        entry.update({k: v for k, v in r.items() if k != "raw_output"})
        entry.update(extra)
        reqs = r.get("requests")
        if extra.get("cpu") is not None and reqs:
            entry["cpu_s_per_10k"] = extra["cpu"] / reqs * 10_000
        if extra.get("upstream_cpu") is not None and reqs:
            entry["upstream_cpu_s_per_10k"] = extra["upstream_cpu"] / reqs * 10_000
        if r.get("errors"):
            msg = (f"{load} {case} w{w} round {rnd}: {r.get('errors')} errors "
                   f"{r.get('error_text', '')}").strip()
            self.errors.append(msg)
            log(f"    ! {msg}")
        self.raw.append(entry)
        log("    " + short(entry))


def short(e: dict) -> str:
    bits = [f"{e['load']:<10} {e['case']:<26} w{e['workers']}"]
    for key, label, f in (("rps", "req/s", "{:.0f}"), ("p50_ms", "p50", "{:.2f}ms"),
                          ("p99_ms", "p99", "{:.2f}ms"), ("mean_ms", "mean", "{:.2f}ms"),
                          ("mb_s", "MB/s", "{:.0f}"), ("cpu_s_per_10k", "cpu/10k", "{:.3f}s"),
                          ("rss_idle_kib", "rss", None), ("rss_peak_kib", "peak", None),
                          ("rss_held_kib", "held", None), ("errors", "err", "{}")):
        v = e.get(key)
        if v is None:
            continue
        s = f"{v / 1024:.1f}MiB" if f is None else f.format(v)
        bits.append(f"{label}={s}")
    return " ".join(bits)


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def last_upload_length(path: Path, skip: int) -> int | None:
    try:
        lines = path.read_text().splitlines()[skip:]
    except OSError:
        return None
    if not lines:
        return None
    return int(lines[-1].split()[-1])


def read_response(s: socket.socket) -> int:
    """Sends one keep-alive GET / and reads the whole response; returns the status."""
    s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return 0
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            return 0
        body += chunk
    return int(head.split(b" ", 2)[1])


# ---------------------------------------------------------------------------------------------
# Output parsing
# ---------------------------------------------------------------------------------------------

TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def to_ms(num: str, unit: str) -> float:
    return float(num) * TIME_UNITS[unit]


def parse_wrk(out: str) -> dict:
    r: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),\s+([\d.]+)([KMGT]?B) read", out)
    if m:
        r["requests"] = int(m.group(1))
        r["elapsed_s"] = to_ms(m.group(2), m.group(3)) / 1e3
        r["bytes"] = float(m.group(4)) * SIZE_UNITS[m.group(5)]
        r["mb_s"] = r["bytes"] / 1e6 / r["elapsed_s"]
    else:
        r["requests"] = None
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
        r[f"p{pct}_ms"] = to_ms(m.group(1), m.group(2)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    r["errors"] = r["non_2xx"] + r["socket_errors"]
    if r["rps"] is None:
        r["errors"] += 1
        r["error_text"] = "wrk output not understood"
    elif r["errors"]:
        r["error_text"] = f"non-2xx {r['non_2xx']}, socket errors {r['socket_errors']}"
    return r


def parse_h2load(out: str) -> dict:
    r: dict = {"requests": None}
    m = re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", out)
    if m:
        r["elapsed_s"] = to_ms(m.group(1), m.group(2)) / 1e3
        r["rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if m:
        total, _, done, ok, failed, errored, timeout = map(int, m.groups())
        r["requests"] = ok
        r["failed"] = failed + errored + timeout
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    r["non_2xx"] = sum(int(x) for x in m.groups()[1:]) if m else 0
    m = re.search(r"traffic: [\d.]+\w* \((\d+)\) total", out)
    if m and r.get("elapsed_s"):
        r["bytes"] = int(m.group(1))
        r["mb_s"] = r["bytes"] / 1e6 / r["elapsed_s"]
    m = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+"
                  r"([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if m:
        g = m.groups()
        r["min_ms"], r["max_ms"] = to_ms(g[0], g[1]), to_ms(g[2], g[3])
        r["mean_ms"], r["sd_ms"] = to_ms(g[4], g[5]), to_ms(g[6], g[7])
    r["errors"] = r.get("failed", 0) + r["non_2xx"]
    if r.get("rps") is None or r["requests"] is None:
        r["errors"] += 1
        r["error_text"] = "h2load output not understood"
    elif r["errors"]:
        r["error_text"] = f"failed {r.get('failed')}, non-2xx {r['non_2xx']}"
    return r


# ---------------------------------------------------------------------------------------------
# Aggregation and tables
# ---------------------------------------------------------------------------------------------


def median_of(entries: list[dict]) -> dict:
    out: dict = {"rounds": len(entries)}
    keys = {k for e in entries for k in e}
    for k in keys:
        vals = [e[k] for e in entries if isinstance(e.get(k), (int, float))
                and not isinstance(e.get(k), bool) and e.get(k) == e.get(k)]
        if k in ("round",):
            continue
        if k in ("errors", "non_2xx", "socket_errors", "failed", "closed_by_peer",
                 "token_requests", "log_warnings"):
            out[k] = sum(vals)  # totals over rounds, not medians
        elif vals:
            out[k] = statistics.median(vals)
        elif k in ("load", "case", "workers", "variant", "upstream", "upstream_saw"):
            out[k] = entries[0].get(k)
    texts = [e["error_text"] for e in entries if e.get("error_text")]
    if texts:
        out["error_text"] = " | ".join(texts)
    return out


def aggregate(raw: list[dict]) -> dict:
    groups: dict = {}
    for e in raw:
        groups.setdefault((e["load"], e["case"], e["workers"]), []).append(e)
    return {key: median_of(v) for key, v in groups.items()}


def fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if spec == "mib":
        return f"{v / 1024:.1f}"
    if spec == "d":
        return str(round(v))
    return format(v, spec)


class Table:
    """A titled table. A row {"section": label} opens a section: a line of its own in the text
    and a bold row in Markdown (the targets table has one section per upstream kind)."""

    def __init__(self, title: str, columns: list[tuple[str, str, str]], note: str = ""):
        self.title, self.columns, self.note = title, columns, note
        self.rows: list[dict] = []

    def section(self, label: str) -> None:
        self.rows.append({"section": label})

    def cells(self) -> list[list[str]]:
        return [[r["section"]] + [""] * (len(self.columns) - 1) if "section" in r else
                [fmt(r.get(k), f) if f != "str" else str(r.get(k, "-")) for _, k, f in
                 self.columns] for r in self.rows]

    def text(self) -> str:
        heads = [h for h, _, _ in self.columns]
        rows = self.cells()
        plain = [c for r, c in zip(self.rows, rows) if "section" not in r]
        widths = [max(len(x) for x in col) for col in zip(heads, *plain)]
        line = lambda cells: "  ".join(c.ljust(wd) if i == 0 else c.rjust(wd)
                                       for i, (c, wd) in enumerate(zip(cells, widths)))
        out = [self.title, line(heads), "  ".join("-" * wd for wd in widths)]
        out += [f"[{c[0]}]" if "section" in r else line(c) for r, c in zip(self.rows, rows)]
        if self.note:
            out.append(self.note)
        return "\n".join(out)

    def markdown(self) -> str:
        heads = [h for h, _, _ in self.columns]
        out = [f"### {self.title}", "", "| " + " | ".join(heads) + " |",
               "| " + " | ".join(["---"] + ["---:"] * (len(heads) - 1)) + " |"]
        out += ["| " + " | ".join([f"**{c[0]}**"] + c[1:] if "section" in r else c) + " |"
                for r, c in zip(self.rows, self.cells())]
        if self.note:
            out += ["", self.note]
        return "\n".join(out)

    def as_json(self) -> dict:
        return {"title": self.title, "columns": [h for h, _, _ in self.columns],
                "rows": self.cells(), "note": self.note}


def sub(a, b):
    return None if a is None or b is None else a - b


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def rss_ratio(a, b):
    """Ratio of two RSS increases (KiB), or None when the peer's is under 0.1 MiB (noise)."""
    return None if b is None or b < 100 else ratio(a, b)


def refresh_round_ratios(raw: list[dict], w: int) -> list[float]:
    """req/s with 2 s tokens / req/s with 3600 s tokens, for each round's interleaved slices."""
    runs: dict = {}
    for e in raw:
        if e["load"] == "refresh" and e["workers"] == w and e.get("rps"):
            runs.setdefault(e["round"], {})[e["variant"]] = e["rps"]
    return [v["2s"] / v["3600s"] for _, v in sorted(runs.items()) if "2s" in v and "3600s" in v]


def refresh_summary(agg: dict, raw: list[dict], w: int) -> dict | None:
    a = agg.get(("refresh", "token-proxy (3600s tokens)", w))
    b = agg.get(("refresh", "token-proxy (2s tokens)", w))
    if not a or not b:
        return None
    rounds = refresh_round_ratios(raw, w)
    rr = statistics.median(rounds) if rounds else None
    errs = a.get("errors", 0) + b.get("errors", 0)
    loss = (1 - rr) * 100 if rr is not None else None
    return {"workers": w, "rps_a": a.get("rps"), "rps_b": b.get("rps"), "ratio": rr,
            "rounds": len(rounds),
            "spread": f"{min(rounds):.3f}..{max(rounds):.3f}" if rounds else "-",
            "loss": loss, "tokens": b.get("token_requests"), "errors": errs,
            "warnings": a.get("log_warnings", 0) + b.get("log_warnings", 0),
            "ok": "yes" if loss is not None and loss <= 2 and errs == 0 else "no"}


# What each upstream kind means for the peers, for the notes under its tables.
KIND_NOTE = {
    "http": "",
    "https": ("Clients speak plain HTTP/1.1 to the proxy; every proxy speaks HTTP/1.1 over TLS "
              "to the upstream and verifies its certificate (private CA, name localhost). "
              "direct: wrk itself speaks TLS to the upstream, so the client pays for TLS: a "
              "different shape, not a limit the proxies are held to."),
    "h2tls": ("Clients speak plain HTTP/1.1 to the proxy; the upstream offers h2 and http/1.1 "
              "by ALPN, and every proxy verifies its certificate. nginx: HTTP/1.1 to this "
              "upstream, proxy_pass cannot speak h2 (nginx 1.22). direct: wrk speaks HTTP/1.1 "
              "over TLS itself (it offers no ALPN), so the client pays for TLS: a different "
              "shape."),
}


def saw_note(agg: dict, cases: list[str], workers: list[int], kind: str) -> str:
    """Which HTTP version the upstream saw through each case, from GET /proto (not assumed)."""
    by_proto: dict[str, list[str]] = {}
    for c in cases:
        saw = next((agg[k].get("upstream_saw") for w in workers
                    if (k := (load_name("h1", kind), c, w)) in agg and agg[k].get("upstream_saw")),
                   None)
        if saw:
            by_proto.setdefault(saw.split()[0], []).append(c)
    if not by_proto:
        return ""
    return ("The upstream saw (GET /proto): " + "; ".join(
        f"{proto} from {', '.join(cs)}" for proto, cs in sorted(by_proto.items())) + ".")


def build_tables(agg: dict, raw: list[dict], cases: list[str], workers: list[int],
                 kinds: list[str]) -> list[Table]:
    tables = []

    def rows(load: str):
        for w in workers:
            for c in cases:
                if (load, c, w) in agg:
                    yield c, w, agg[(load, c, w)]

    def tp(load, w):
        return agg.get((load, "token-proxy", w), {})

    ratio_note = ("ratio = token-proxy / that row, same load and workers "
                  "(> 1: token-proxy has more req/s).")
    cols = [("case", "case", "str"), ("workers", "workers", "d"), ("req/s", "rps", ".0f"),
            ("p50 ms", "p50_ms", ".2f"), ("p99 ms", "p99_ms", ".2f"), ("MB/s", "mb_s", ".1f"),
            ("CPU s/10k req", "cpu_s_per_10k", ".3f"), ("RSS idle MiB", "rss_idle_kib", "mib"),
            ("RSS peak MiB", "rss_peak_kib", "mib"), ("tp/peer req/s", "ratio", ".2f"),
            ("upstream saw", "upstream_saw", "str"), ("errors", "errors", "d")]
    cols1 = [("case", "case", "str"), ("workers", "workers", "d"), ("req/s", "rps", ".0f"),
             ("p50 ms", "p50_ms", ".3f"), ("p99 ms", "p99_ms", ".3f"),
             ("added p50 ms", "added_p50", ".3f"), ("added p99 ms", "added_p99", ".3f"),
             ("CPU s/10k req", "cpu_s_per_10k", ".3f"), ("tp/peer req/s", "ratio", ".2f"),
             ("errors", "errors", "d")]
    for kind in kinds:
        load, load1 = load_name("h1", kind), load_name("h1c1", kind)
        note = " ".join(x for x in (KIND_NOTE[kind], saw_note(agg, cases, workers, kind)) if x)
        t = Table(f"HTTP/1.1 keep-alive small GETs, {WRK_CONNS} connections (wrk -t1 "
                  f"-c{WRK_CONNS}), {UPSTREAM_TITLE[kind]} [{load}]", cols,
                  " ".join(x for x in (ratio_note, "CPU and RSS are the proxy's processes; "
                                       "direct has none.", note) if x))
        for c, w, a in rows(load):
            t.rows.append(dict(a, case=c, workers=w,
                               ratio=ratio(tp(load, w).get("rps"), a.get("rps"))))
        tables.append(t)

        t = Table("HTTP/1.1 one connection, one request at a time (wrk -t1 -c1): added latency, "
                  f"{UPSTREAM_TITLE[kind]} [{load1}]", cols1,
                  " ".join(x for x in ("added = this row minus direct, same workers and upstream.",
                                       KIND_NOTE[kind]) if x))
        for c, w, a in rows(load1):
            d = agg.get((load1, "direct", w), {})
            t.rows.append(dict(a, case=c, workers=w,
                               ratio=ratio(tp(load1, w).get("rps"), a.get("rps")),
                               added_p50=sub(a.get("p50_ms"), d.get("p50_ms")) if c != "direct" else None,
                               added_p99=sub(a.get("p99_ms"), d.get("p99_ms")) if c != "direct" else None))
        tables.append(t)

    cols2 = [("case", "case", "str"), ("workers", "workers", "d"), ("req/s", "rps", ".0f"),
             ("mean ms", "mean_ms", ".2f"), ("max ms", "max_ms", ".2f"), ("MB/s", "mb_s", ".1f"),
             ("CPU s/10k req", "cpu_s_per_10k", ".3f"), ("RSS idle MiB", "rss_idle_kib", "mib"),
             ("RSS peak MiB", "rss_peak_kib", "mib"), ("tp/peer req/s", "ratio", ".2f"),
             ("errors", "errors", "d")]
    t = Table(f"HTTP/2 cleartext small GETs (h2load -c{WRK_CONNS} -m{H2_STREAMS})", cols2,
              "h2load reports request time as min/max/mean/sd, not percentiles. "
              "Proxies forward to the upstream over HTTP/1.1. " + ratio_note)
    for c, w, a in rows("h2"):
        t.rows.append(dict(a, case=c, workers=w, ratio=ratio(tp("h2", w).get("rps"), a.get("rps"))))
    tables.append(t)

    for load, title in (("upload", "256 MiB upload (curl -T, POST /upload)"),
                        ("download", "256 MiB download (curl, GET /blob)")):
        colsx = [("case", "case", "str"), ("workers", "workers", "d"), ("MB/s", "mb_s", ".0f"),
                 ("seconds", "seconds", ".2f"), ("CPU s", "cpu", ".2f"),
                 ("RSS before MiB", "rss_idle_kib", "mib"), ("RSS peak MiB", "rss_peak_kib", "mib"),
                 ("RSS increase MiB", "rss_increase_kib", "mib"), ("tp/peer MB/s", "ratio", ".2f"),
                 ("errors", "errors", "d")]
        t = Table(title, colsx, "A fresh proxy process per transfer; RSS increase = VmHWM after "
                  "minus VmRSS before (summed over the peer's processes). MB = 10^6 bytes.")
        for c, w, a in rows(load):
            t.rows.append(dict(a, case=c, workers=w,
                               ratio=ratio(tp(load, w).get("mb_s"), a.get("mb_s"))))
        if t.rows:
            tables.append(t)

    colsi = [("case", "case", "str"), ("workers", "workers", "d"),
             ("RSS idle MiB", "rss_idle_kib", "mib"), (f"RSS with {IDLE_CONNS} conns MiB", "rss_held_kib", "mib"),
             ("increase MiB", "rss_increase_kib", "mib"), ("KiB/conn", "kib_per_conn", ".1f"),
             ("tp/peer RSS", "ratio", ".2f"), ("errors", "errors", "d")]
    t = Table(f"{IDLE_CONNS:,} idle keep-alive client connections (one GET each, then held)", colsi,
              "tp/peer RSS < 1: token-proxy uses less memory. errors = failed requests + "
              "connections the proxy closed during the hold.")
    for c, w, a in rows("idle"):
        t.rows.append(dict(a, case=c, workers=w,
                           ratio=ratio(tp("idle", w).get("rss_held_kib"), a.get("rss_held_kib"))))
    if t.rows:
        tables.append(t)

    colsr = [("workers", "workers", "d"), ("req/s 3600 s tokens", "rps_a", ".0f"),
             ("req/s 2 s tokens", "rps_b", ".0f"), ("ratio", "ratio", ".3f"),
             ("rounds", "rounds", "d"), ("round ratios", "spread", "str"),
             ("loss %", "loss", ".1f"),
             ("token requests (2 s)", "tokens", ".0f"), ("errors", "errors", "d"),
             ("log warnings", "warnings", "d"), ("target met", "ok", "str")]
    t = Table("Token refresh under load: the small-GET load with 2-second tokens", colsr,
              "Both variants run side by side and the load alternates between them in "
              f"{SLICE_S} s slices, A B B A. ratio = median over rounds of req/s with 2 s "
              "tokens / req/s with 3600 s tokens, each round's from its interleaved slices. "
              "Target: loss <= 2 % and no error. token requests = requests to the token "
              "endpoint while the slices ran (the 2 s variant refreshes, loaded or not).")
    for w in workers:
        row = refresh_summary(agg, raw, w)
        if row:
            t.rows.append(row)
    if t.rows:
        tables.append(t)
    return tables


def round_ratios(raw: list[dict], load: str, w: int, key: str) -> list[float]:
    """token-proxy / nginx for `key` within each round of `load`, in round order."""
    by_round: dict[int, dict[str, float]] = {}
    for e in raw:
        if e["load"] == load and e["workers"] == w and e.get(key) is not None:
            by_round.setdefault(e["round"], {})[e["case"]] = e[key]
    return [r["token-proxy"] / r["nginx"] for _, r in sorted(by_round.items())
            if r.get("token-proxy") and r.get("nginx")]


def paired_row(label: str, raw: list[dict], load: str, w: int, key: str,
               min_rounds: int = 2) -> list[dict]:
    """token-proxy / nginx within each round, where the two ran back to back (so drift over the
    run cancels): the ratios, and their median in the ratio column. No row for fewer than
    `min_rounds` rounds (one round of back-to-back runs says no more than the medians do)."""
    ratios = round_ratios(raw, load, w, key)
    if len(ratios) < min_rounds:
        return []
    return [{"target": label, "workers": w, "tp": " ".join(f"{x:.2f}" for x in ratios),
             "ng": "-", "ratio": statistics.median(ratios)}]


def fmt_or_dash(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def interleaved_rows(agg: dict, raw: list[dict], load: str, w: int) -> list[dict]:
    """The headline rows: token-proxy and nginx side by side on one upstream kind, the load
    alternating between them in 1 s slices (`h1x`, `h1x-https`, `h1x-h2tls`). Each one's value
    is its median over rounds; the ratio is the median of the ratios within each round (drift
    over the run cancels in those), with the ratios round by round when there are several."""
    tp, ng = agg.get((load, "token-proxy", w)), agg.get((load, "nginx", w))
    if not tp or not ng:
        return []
    out = []
    for key, label, spec in (("rps", "req/s", ".0f"), ("p99_ms", "p99 ms", ".2f"),
                             ("cpu_s_per_10k", "CPU s per 10,000 requests", ".3f")):
        rr = round_ratios(raw, load, w, key)
        out.append({"target": f"* small GETs {label}, interleaved 1 s slices", "workers": w,
                    "tp": fmt_or_dash(tp.get(key), spec), "ng": fmt_or_dash(ng.get(key), spec),
                    "ratio": statistics.median(rr) if rr else ratio(tp.get(key), ng.get(key))})
        if len(rr) >= 2:
            out.append({"target": "  ... round by round", "workers": w,
                        "tp": " ".join(f"{x:.2f}" for x in rr), "ng": "-",
                        "ratio": statistics.median(rr)})
    return out


def separate_rows(agg: dict, raw: list[dict], kind: str, w: int) -> list[dict]:
    """token-proxy against nginx from the separate runs on one upstream kind (`h1*`, `h1c1*`),
    and the latency each adds over direct to the same upstream."""
    load, load1 = load_name("h1", kind), load_name("h1c1", kind)
    g = lambda ld, case: agg.get((ld, case, w), {})
    tp, ng, dr = g(load, "token-proxy"), g(load, "nginx"), g(load, "direct")
    tp1, ng1, dr1 = g(load1, "token-proxy"), g(load1, "nginx"), g(load1, "direct")
    s = fmt_or_dash
    if not tp:
        return []
    rows = [
        {"target": "small GETs req/s (64 conns), separate runs", "workers": w,
         "tp": s(tp.get("rps"), ".0f"), "ng": s(ng.get("rps"), ".0f"),
         "ratio": ratio(tp.get("rps"), ng.get("rps"))},
        *paired_row("  ... round by round", raw, load, w, "rps"),
        {"target": "small GETs p99 ms (64 conns), separate runs", "workers": w,
         "tp": s(tp.get("p99_ms"), ".2f"), "ng": s(ng.get("p99_ms"), ".2f"),
         "ratio": ratio(tp.get("p99_ms"), ng.get("p99_ms"))},
        {"target": "CPU s per 10,000 requests, separate runs", "workers": w,
         "tp": s(tp.get("cpu_s_per_10k"), ".3f"), "ng": s(ng.get("cpu_s_per_10k"), ".3f"),
         "ratio": ratio(tp.get("cpu_s_per_10k"), ng.get("cpu_s_per_10k"))},
    ]
    over = "direct" if kind == "http" else "direct (wrk doing TLS)"
    if tp1 and dr1:
        a_tp, a_ng = sub(tp1.get("p50_ms"), dr1.get("p50_ms")), sub(ng1.get("p50_ms"), dr1.get("p50_ms"))
        rows.append({"target": f"added p50 latency over {over}, 1 conn (ms)", "workers": w,
                     "tp": s(a_tp, ".3f"), "ng": s(a_ng, ".3f"), "ratio": ratio(a_tp, a_ng)})
    if dr:
        a_tp, a_ng = sub(tp.get("p99_ms"), dr.get("p99_ms")), sub(ng.get("p99_ms"), dr.get("p99_ms"))
        rows.append({"target": f"added p99 latency over {over}, 64 conns (ms)", "workers": w,
                     "tp": s(a_tp, ".2f"), "ng": s(a_ng, ".2f"), "ratio": ratio(a_tp, a_ng)})
    return rows


def plain_only_rows(agg: dict, raw: list[dict], w: int) -> list[dict]:
    """Memory and token refresh, measured on the plain upstream only."""
    g = lambda load, case: agg.get((load, case, w), {})
    m = lambda v: "-" if v is None else f"{v / 1024:.1f} MiB"
    rows = []
    tp, ng = g("h1", "token-proxy"), g("h1", "nginx")
    if tp:
        rows.append({"target": "idle RSS", "workers": w, "tp": m(tp.get("rss_idle_kib")),
                     "ng": m(ng.get("rss_idle_kib")),
                     "ratio": ratio(tp.get("rss_idle_kib"), ng.get("rss_idle_kib"))})
    ti, ni = g("idle", "token-proxy"), g("idle", "nginx")
    if ti:
        rows.append({"target": f"RSS with {IDLE_CONNS:,} idle keep-alive conns", "workers": w,
                     "tp": m(ti.get("rss_held_kib")), "ng": m(ni.get("rss_held_kib")),
                     "ratio": ratio(ti.get("rss_held_kib"), ni.get("rss_held_kib"))})
    tu, nu = g("upload", "token-proxy"), g("upload", "nginx")
    if tu:
        rows.append({"target": "RSS increase during a 256 MiB upload", "workers": w,
                     "tp": m(tu.get("rss_increase_kib")), "ng": m(nu.get("rss_increase_kib")),
                     "ratio": rss_ratio(tu.get("rss_increase_kib"), nu.get("rss_increase_kib"))})
    rs = refresh_summary(agg, raw, w)
    if rs:
        rr, errs = rs["ratio"], rs["errors"]
        met = "met" if rs["ok"] == "yes" else "NOT met"
        rows.append({"target": "2 s tokens under load: req/s kept (>= 0.98, no error)",
                     "workers": w, "tp": f"{rr:.3f}, {errs} errors ({met})",
                     "ng": "-", "ratio": None})
    return rows


def targets_table(agg: dict, raw: list[dict], workers: list[int], kinds: list[str]) -> Table:
    """One section per upstream kind, its headline first: token-proxy / nginx from the
    interleaved slices (rows marked *); then the separate runs; then a section for what is
    measured on the plain upstream only (memory, token refresh)."""
    t = Table("Targets: token-proxy against nginx and direct",
              [("target", "target", "str"), ("workers", "workers", "d"), ("token-proxy", "tp", "str"),
               ("nginx", "ng", "str"), ("token-proxy/nginx", "ratio", ".2f")],
              "* headline: token-proxy and nginx running side by side, the load alternating "
              f"between them in {SLICE_S} s slices (A B B A); values are medians over rounds, "
              "the ratio the median of the ratios within each round. Other rows come from the "
              "separate runs of each case. Clients always speak plain HTTP/1.1 to the proxy.")
    for kind in kinds:
        label = f"upstream {kind}: {UPSTREAM_TITLE[kind]}"
        if kind == "h2tls":
            label += " (nginx: HTTP/1.1 to this upstream, proxy_pass cannot speak h2)"
        t.section(label)
        n = len(t.rows)
        for w in workers:
            t.rows += interleaved_rows(agg, raw, load_name("h1x", kind), w)
            t.rows += separate_rows(agg, raw, kind, w)
        if len(t.rows) == n:
            t.rows.append({"target": "no token-proxy result on this upstream: see the problems",
                           "workers": None, "tp": "-", "ng": "-", "ratio": None})
    rest = [r for w in workers for r in plain_only_rows(agg, raw, w)]
    if rest:
        t.section("memory and token refresh (plain http upstream)")
        t.rows += rest
    return t


# ---------------------------------------------------------------------------------------------
# Chart
# ---------------------------------------------------------------------------------------------


def write_chart(out: Path, agg: dict, cases: list[str], workers: list[int],
                kinds: list[str]) -> Path | None:
    """One cluster of bars per case and upstream kind ("nginx", "nginx https", ...). With more
    than one kind the two panels are stacked, so that 15 clusters stay readable."""
    dat = out / "chart.dat"
    lines = ["# case " + " ".join(f"rps_w{w}" for w in workers) + " " +
             " ".join(f"p99ms_w{w}" for w in workers)]
    for kind in kinds:
        for c in cases:
            rps = [agg.get((load_name("h1", kind), c, w), {}).get("rps") for w in workers]
            p99 = [agg.get((load_name("h1", kind), c, w), {}).get("p99_ms") for w in workers]
            if all(v is None for v in rps):
                continue
            vals = ["NaN" if v is None else f"{v:.3f}" for v in rps + p99]
            label = c if kind == "http" else f"{c} {kind}"
            lines.append(f'"{label}" ' + " ".join(vals))
    dat.write_text("\n".join(lines) + "\n")
    stacked = len(kinds) > 1
    size, layout = ("1800,1100", "2,1") if stacked else ("1400,560", "1,2")
    terms = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True)
    term = f"pngcairo size {size} font 'Sans,11'" if "pngcairo" in (terms.stdout + terms.stderr) \
        else f"png size {size}"
    png = out / "chart.png"
    n = len(workers)

    def plot(first: int, label_fmt: str, scale: float = 1.0) -> str:
        parts = []
        for i, w in enumerate(workers):
            title = f"{w} worker{'s' if w > 1 else ''}"
            src = f"'{dat}'" if i == 0 else "''"
            xt = ":xtic(1)" if i == 0 else ""
            parts.append(f"{src} using {first + i}{xt} title '{title}'")
        # Value labels over the bars: in a clustered histogram with gap 1, bar i of n sits at
        # x = cluster + (i - (n-1)/2) / (n+1).
        for i in range(n):
            off = (i - (n - 1) / 2) / (n + 1)
            parts.append(f"'' using ($0{off:+.4f}):{first + i}:(sprintf('{label_fmt}', "
                         f"column({first + i}) / {scale})) with labels offset 0,0.7 font ',9' notitle")
        return ", ".join(parts)

    gp = out / "chart.gp"
    gp.write_text(f"""\
set terminal {term}
set output '{png}'
set multiplot layout {layout} title "token-proxy benchmark: HTTP/1.1 small GETs, {WRK_CONNS} keep-alive connections (wrk), median of rounds, {os.cpu_count()} cores; upstream kinds: {', '.join(kinds)}"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key outside bottom center horizontal
set yrange [0:*]
set offsets 0, 0, graph 0.08, 0
set xtics nomirror{" rotate by -25" if stacked else ""}
set ytics nomirror
set title "requests per second (higher is better)"
set ylabel "req/s"
set format y "%.0f"
plot {plot(2, "%.0fk", 1000.0)}
set title "p99 latency (lower is better)"
set ylabel "ms"
set format y "%.1f"
plot {plot(2 + n, "%.2f")}
unset multiplot
""")
    r = subprocess.run(["gnuplot", str(gp)], capture_output=True, text=True)
    if r.returncode != 0 or not png.exists() or png.stat().st_size == 0:
        print(f"warning: chart not written: {r.stderr.strip()}", file=sys.stderr)
        return None
    return png


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    text = (r.stdout + r.stderr).strip().splitlines()
    return text[0].strip() if text else ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="benches/run.py",
        description="Benchmark token-proxy against direct access, nginx, HAProxy, Caddy and "
                    "Pingora on 127.0.0.1. Builds the release binary (and on first use the "
                    "Pingora peer in benches/pingora: several minutes), starts everything it "
                    "needs, alternates the cases (A B A B) and writes results.json, results.md "
                    "and chart.png.",
        epilog="Needs: " + " ".join(TOOL_PACKAGE) + " and cargo (cmake and cargo to build the "
               "Pingora peer, whenever its binary is missing or older than its sources). "
               "Missing tools: apt-get install -y " + " ".join(APT_LINE))
    p.add_argument("--workers", default="1,2",
                   help="worker threads/processes for every proxy, comma-separated (default 1,2)")
    p.add_argument("--duration", type=int, default=5,
                   help="whole seconds per measured wrk/h2load run (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="A B A B rounds (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 worker, 2 s, 1 round, no 256 MiB or idle-connection cases")
    p.add_argument("--only", default=",".join(CASES),
                   help="cases to run, comma-separated, from: " + ",".join(CASES) +
                        " (default all; the upstream nginx always runs)")
    p.add_argument("--upstreams", default=",".join(UPSTREAMS),
                   help="upstream kinds the HTTP/1.1 small-GET loads (separate and interleaved) "
                        "run against, comma-separated, from: http (plain), https (TLS, "
                        "HTTP/1.1), h2tls (TLS offering h2) (default all three; the other loads "
                        "always use the plain upstream)")
    p.add_argument("--out", default="target/bench",
                   help="output directory, relative to the repository (default target/bench)")
    p.add_argument("--no-pin", action="store_true",
                   help="let the scheduler place every process (default: with fewer workers "
                        "than CPUs, the proxy and the upstream run on the last `workers` CPUs "
                        "and the load generator on the others)")
    p.add_argument("--skip-build", action="store_true",
                   help="use the existing target/release/token-proxy instead of building it "
                        "(the Pingora peer is built whenever it is missing or stale, whatever "
                        "this says)")
    args = p.parse_args(argv)
    try:
        args.workers_list = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    except ValueError:
        p.error("--workers takes integers such as 1,2")
    if not args.workers_list or min(args.workers_list) < 1:
        p.error("--workers must list numbers >= 1")
    args.cases = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        p.error(f"unknown case(s) {', '.join(bad)}; choose from {', '.join(CASES)}")
    args.cases = [c for c in CASES if c in args.cases]  # fixed order
    kinds = [k.strip() for k in args.upstreams.split(",") if k.strip()]
    bad = [k for k in kinds if k not in UPSTREAMS]
    if bad or not kinds:
        p.error(f"unknown upstream kind(s) {', '.join(bad) or '(none)'}; "
                f"choose from {', '.join(UPSTREAMS)}")
    args.kinds = [k for k in UPSTREAMS if k in kinds]  # fixed order
    if args.quick:
        args.workers_list, args.duration, args.rounds = [1], 2, 1
    if args.duration <= 0 or args.rounds < 1:
        p.error("--duration must be > 0 and --rounds >= 1")
    return args


def preflight(args) -> None:
    needed = ["wrk", "h2load", "nginx", "curl", "gnuplot"]
    if set(args.kinds) - {"http"}:
        needed.append("openssl")  # the private CA of the HTTPS upstream
    needed += [c for c in ("haproxy", "caddy") if c in args.cases]
    pingora_build = "pingora" in args.cases and pingora_stale()
    if pingora_build:
        needed.append("cmake")  # zlib-ng, built by pingora-core's flate2
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        pkgs = [TOOL_PACKAGE[t] for t in missing]
        ordered = [p for p in APT_LINE if p in pkgs] + [p for p in pkgs if p not in APT_LINE]
        print("missing: " + ", ".join(missing) + ". Install with:", file=sys.stderr)
        print("apt-get install -y " + " ".join(ordered))
        print("(or leave a missing peer out with --only, e.g. --only direct,token-proxy,nginx)",
              file=sys.stderr)
        sys.exit(2)
    if not args.skip_build and shutil.which("cargo") is None:
        print("cargo is missing: install Rust (https://rustup.rs), or pass --skip-build",
              file=sys.stderr)
        sys.exit(2)
    if pingora_build and shutil.which("cargo") is None:
        print(f"cargo is missing: the Pingora peer ({PINGORA_BIN.relative_to(REPO)}) must be "
              "built; install Rust (https://rustup.rs), or leave pingora out of --only",
              file=sys.stderr)
        sys.exit(2)


def build(args, out: Path) -> tuple[Path, float | None]:
    built = REPO / "target" / "release" / "token-proxy"
    secs = None
    if not args.skip_build:
        log("$ cargo build --release --locked")
        t0 = time.time()
        r = subprocess.run(["cargo", "build", "--release", "--locked"], cwd=REPO)
        secs = time.time() - t0
        if r.returncode != 0:
            print(f"cargo build failed (exit {r.returncode})", file=sys.stderr)
            sys.exit(1)
        log(f"  built in {secs:.1f} s")
    if not built.exists():
        print(f"{built} does not exist; build it or drop --skip-build", file=sys.stderr)
        sys.exit(1)
    # A private copy: a rebuild during the run cannot swap the binary under the benchmark.
    (out / "bin").mkdir(parents=True, exist_ok=True)
    copy = out / "bin" / "token-proxy"
    shutil.copy2(built, copy)
    REG.temp_paths.append(out / "bin")
    return copy, secs


def pingora_sources() -> list[Path]:
    return [PINGORA_DIR / "Cargo.toml", PINGORA_DIR / "Cargo.lock",
            *sorted((PINGORA_DIR / "src").rglob("*.rs"))]


def pingora_stale() -> bool:
    """Whether the Pingora peer must be built: its binary is missing or older than a source."""
    if not PINGORA_BIN.exists():
        return True
    built = PINGORA_BIN.stat().st_mtime
    return any(f.stat().st_mtime > built for f in pingora_sources())


def build_pingora(out: Path) -> tuple[Path, float | None]:
    """Builds the Pingora peer (benches/pingora, its own Cargo.lock and target directory) when
    it is missing or older than its sources, and copies it into the out dir like token-proxy.
    The first build compiles Pingora and its ~230 dependencies with token-proxy's release
    profile (fat LTO): about 6 minutes at -j 1 on 2 cores, a rebuild after a change to
    src/main.rs about 1.5 minutes (see benches/README.md); CARGO_BUILD_JOBS limits the jobs."""
    secs = None
    rel = lambda p: p.relative_to(REPO)
    if pingora_stale():
        argv = ["cargo", "build", "--release", "--locked", "--manifest-path",
                str(rel(PINGORA_DIR / "Cargo.toml")), "--target-dir", str(rel(PINGORA_TARGET))]
        log("$ " + " ".join(argv) + ("" if PINGORA_BIN.exists() else
                                     "  (first use: builds Pingora, about 6 min at -j 1)"))
        t0 = time.time()
        r = subprocess.run(argv, cwd=REPO)
        secs = time.time() - t0
        if r.returncode != 0 or not PINGORA_BIN.exists():
            print(f"building the Pingora peer failed (exit {r.returncode})", file=sys.stderr)
            sys.exit(1)
        PINGORA_BIN.touch()  # cargo keeps an unchanged binary's old mtime: mark it fresh
        log(f"  built the Pingora peer in {secs:.1f} s")
    else:
        log(f"{rel(PINGORA_BIN)} is newer than its sources: not rebuilt")
    (out / "bin").mkdir(parents=True, exist_ok=True)
    copy = out / "bin" / "pingora-peer"
    shutil.copy2(PINGORA_BIN, copy)
    return copy, secs


def pingora_version() -> str:
    """pingora-proxy's version as locked in benches/pingora/Cargo.lock (what was built)."""
    try:
        lock = (PINGORA_DIR / "Cargo.lock").read_text()
    except OSError as e:
        return f"unavailable: {e}"
    m = re.search(r'name = "pingora-proxy"\nversion = "([^"]+)"', lock)
    return (f"pingora-proxy {m.group(1) if m else '?'} (rustls; benches/pingora, "
            + tool_version([str(PINGORA_BIN), "--version"]) + ")")


def main(argv=None) -> int:
    args = parse_args(argv)
    preflight(args)
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "logs", "configs", "tls"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for stale in ("results.json", "results.md", "chart.png", "chart.gp", "chart.dat"):
        (out / stale).unlink(missing_ok=True)

    atexit.register(REG.cleanup)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE_CONNS * 4 + 1024
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))

    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.time()
    binary, build_secs = build(args, out)
    bench = Bench(args, out)
    bench.binary = binary
    pingora_build_secs = None
    if "pingora" in args.cases:
        bench.pingora, pingora_build_secs = build_pingora(out)

    cases, workers, kinds = args.cases, args.workers_list, args.kinds
    big = not args.quick
    log(f"cases: {', '.join(cases)}; workers: {workers}; upstreams: {', '.join(kinds)}; "
        f"{args.rounds} round(s) of {args.duration:g} s runs; out: {out}")
    placements: dict[str, str] = {}
    try:
        bench.setup(workers, cases, kinds)
        up = bench.up_ports
        log(f"upstream nginx (1 worker) on 127.0.0.1:{up['http']} (h2c :{up['h2c']}"
            + (f", https :{up['https']}, h2tls :{up['h2tls']}" if bench.tls else "") + ")")
        for rnd in range(1, args.rounds + 1):
            for w in workers:
                placements[str(w)] = bench.place(w).describe()
                log(f"-- round {rnd}/{args.rounds}, workers {w}; {placements[str(w)]}")
                steps = []
                # The small GETs kind by kind, the cases alternating within each kind, so that
                # the figures compared with each other (same kind) run close together.
                for kind in kinds:
                    for c in cases:
                        steps.append((c, load_name("GET", kind),
                                      lambda c=c, kind=kind: bench.run_get(c, w, rnd, kind)))
                for c in cases:
                    steps.append((c, "h2c", lambda c=c: bench.run_h2(c, w, rnd)))
                    if big:
                        if c != "direct":
                            steps.append((c, "idle", lambda c=c: bench.run_idle(c, w, rnd)))
                        steps.append((c, "upload", lambda c=c: bench.run_transfer("upload", c, w, rnd)))
                        steps.append((c, "download", lambda c=c: bench.run_transfer("download", c, w, rnd)))
                if "token-proxy" in cases and "nginx" in cases:
                    for kind in kinds:
                        steps.append(("token-proxy and nginx", load_name("interleaved GET", kind),
                                      lambda kind=kind: bench.run_interleaved_get(w, rnd, kind)))
                if "token-proxy" in cases:
                    steps.append(("token-proxy", "refresh", lambda: bench.run_refresh(w, rnd)))
                for c, what, fn in steps:
                    try:
                        fn()
                    except (RuntimeError, OSError) as e:
                        msg = f"{what} {c} w{w} round {rnd}: {e}"
                        bench.errors.append(msg)
                        log(f"    ! {msg}")
    finally:
        if bench.upstream:
            bench.upstream.stop()

    total_secs = time.time() - t_start
    agg = aggregate(bench.raw)
    tables = build_tables(agg, bench.raw, cases, workers, kinds)
    if "token-proxy" in cases:
        tables.append(targets_table(agg, bench.raw, workers, kinds))
    png = write_chart(out, agg, cases, workers, kinds)

    versions = {
        "token-proxy": tool_version([str(binary), "--version"]),
        "rustc": tool_version(["rustc", "--version"]),
        "nginx": tool_version(["nginx", "-v"]),
        "haproxy": tool_version(["haproxy", "-v"]) if shutil.which("haproxy") else None,
        "caddy": tool_version(["caddy", "version"]) if shutil.which("caddy") else None,
        "pingora": pingora_version() if "pingora" in cases else None,
        "wrk": tool_version(["wrk", "-v"]),
        "h2load": tool_version(["h2load", "--version"]),
        "curl": tool_version(["curl", "--version"]),
        "openssl": tool_version(["openssl", "version"]) if shutil.which("openssl") else None,
        "gnuplot": tool_version(["gnuplot", "--version"]),
        "python": sys.version.split()[0],
    }
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "duration_total_s": round(total_secs, 1),
        "cargo_build_s": None if build_secs is None else round(build_secs, 1),
        # None when the Pingora peer was not built in this run (up to date, or not selected).
        "pingora_build_s": None if pingora_build_secs is None else round(pingora_build_secs, 1),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                    "cpu": cpu_model(), "mem_total_kib": mem_total()},
        "git": {"commit": git("rev-parse", "HEAD"),
                "dirty_files": len(git("status", "--porcelain").splitlines())},
        "options": {"workers": workers, "duration_s": args.duration, "rounds": args.rounds,
                    "quick": args.quick, "cases": cases, "wrk_connections": WRK_CONNS,
                    "h2_streams_per_conn": H2_STREAMS, "idle_connections": IDLE_CONNS,
                    "transfer_bytes": BLOB_SIZE, "pinned": not args.no_pin,
                    "upstreams": kinds},
        "placement": placements,
        "upstream_tls": None if not bench.tls else {
            "ca": str(bench.tls["ca"]), "certificate": str(bench.tls["cert"]),
            "key": "ECDSA P-256", "names": [f"DNS:{TLS_NAME}", "IP:127.0.0.1"],
            "ports": {k: bench.up_ports[k] for k in ("https", "h2tls")},
            "alpn_chosen_when_offered_h2": bench.upstream_alpn},
        "versions": versions,
        "configs": sorted(str(p.relative_to(out)) for p in (out / "configs").iterdir()),
    }
    header = (f"token-proxy benchmark, {meta['date']}, {os.cpu_count()} cores "
              f"({meta['machine']['cpu']}), workers {workers}, {args.rounds} round(s) of "
              f"{args.duration:g} s, median over rounds. Total {total_secs / 60:.1f} min. "
              "Placement: " + "; ".join(f"{w} worker(s): {d}" for w, d in placements.items())
              + ".")
    log("")
    log(header)
    for t in tables:
        log("")
        log(t.text())
    if bench.errors:
        log("")
        log(f"{len(bench.errors)} problem(s):")
        for e in bench.errors:
            log(f"  - {e}")

    results = {"meta": meta, "tables": [t.as_json() for t in tables],
               "summary": [v for v in agg.values()], "raw": bench.raw, "problems": bench.errors}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# token-proxy benchmark results", "", header, "",
          "Figures move from run to run; compare the ratios. Configurations: `configs/`.", ""]
    for t in tables:
        md += [t.markdown(), ""]
    if bench.errors:
        md += ["### Problems", ""] + [f"- {e}" for e in bench.errors] + [""]
    if png:
        md += ["![req/s and p99 per proxy](chart.png)", ""]
    md += ["Versions: " + "; ".join(f"{k} `{v}`" for k, v in versions.items() if v), ""]
    (out / "results.md").write_text("\n".join(md))
    log("")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}"
        + (f", {png} ({png.stat().st_size} bytes)" if png else " (no chart)"))
    log(f"total time {total_secs:.0f} s")
    return 1 if bench.errors else 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
