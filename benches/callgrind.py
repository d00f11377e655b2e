#!/usr/bin/env python3
"""Instructions per proxied GET, counted by callgrind: where token-proxy's request path spends
its work, in a figure that does not move with machine noise.

    cargo build --profile profiling --locked
    python3 benches/callgrind.py --upstream https          # or http (default both)
    python3 benches/callgrind.py --requests 20000 --connections 16 --top 25

It starts an nginx upstream (plain and TLS, with a private CA made here with openssl, and a
token endpoint), runs `target/profiling/token-proxy` under `valgrind --tool=callgrind` with
instrumentation off, warms up, switches instrumentation on for a fixed number of requests
(`h2load --h1`, keep-alive connections), and divides the instructions counted by the requests.
With `--top`, it prints the functions with the most inclusive instructions per request
(`callgrind_annotate`). Standard library only; needs valgrind, nginx, h2load and openssl.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "callgrind-bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on port {port} after {timeout:.0f} s")


def make_ca(d: Path) -> Path:
    """A private CA and a certificate for localhost and 127.0.0.1 signed by it."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return d / "ca.pem"


def upstream_conf(d: Path, plain: int, tls: int, h2tls: int) -> Path:
    conf = d / "nginx.conf"
    conf.write_text(f"""\
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{plain};
    listen 127.0.0.1:{tls} ssl;
    listen 127.0.0.1:{h2tls} ssl http2;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    location / {{ default_type text/plain; return 200 "hello\\n"; }}
    location = /oauth2/token {{
      default_type application/json;
      return 200 '{{"token_type":"Bearer","expires_in":3600,"access_token":"{TOKEN}"}}';
    }}
  }}
}}
""")
    return conf


def proxy_conf(d: Path, kind: str, listen: int, ports: dict, ca: Path, prefixed: bool) -> Path:
    plain = ports["http"]
    upstream = f"http://127.0.0.1:{plain}" if kind == "http" else f"https://localhost:{ports[kind]}"
    extra = f'ca_file = "{ca}"\n' if kind != "http" else ""
    if prefixed:
        # Two routes share the listener; requests go to the second (see PATH).
        extra += f"""path_prefix = "/items"

[[routes]]
listen = "127.0.0.1:{listen}"
path_prefix = "/graph"
upstream = "{upstream}/other"
credential = "bench"
{extra}"""
    conf = d / f"token-proxy-{kind}.toml"
    conf.write_text(f"""\
workers = 1
access_log = false

[credentials.bench]
token_url = "http://127.0.0.1:{plain}/oauth2/token"
client_id = "bench"
client_secret = "bench-secret"

[[routes]]
listen = "127.0.0.1:{listen}"
upstream = "{upstream}"
credential = "bench"
{extra}""")
    return conf


#: What the clients ask for: under the prefixed route's `/items` with `--prefixed`, and the same
#: path with one route, so that the two runs differ only in the routing.
PATH = "/items/x"


def h2load(port: int, n: int, c: int, client: str) -> None:
    # h1: HTTP/1.1 keep-alive; h2c: HTTP/2 with prior knowledge, 10 streams per connection.
    mode = ["--h1"] if client == "h1" else ["-m", "10"]
    out = subprocess.run(
        ["h2load", *mode, "-n", str(n), "-c", str(c), "-t", "1", f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, timeout=600)
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out.stdout)
    if out.returncode != 0 or not m or int(m.group(3)) != n:
        sys.exit(f"h2load did not complete {n} requests:\n{out.stdout}\n{out.stderr}")


def measure(kind: str, d: Path, binary: Path, ports: dict, ca: Path,
            n: int, c: int, top: int, client: str, prefixed: bool) -> int:
    listen = free_port()
    conf = proxy_conf(d, kind, listen, ports, ca, prefixed)
    out = d / f"callgrind-{kind}.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         str(binary), "run", "--config", str(conf)],
        stdout=subprocess.DEVNULL, stderr=open(d / f"valgrind-{kind}.log", "w"),
        start_new_session=True)
    try:
        wait_port(listen)
        h2load(listen, max(1000, n // 10), c, client)  # warm-up: connections, token, caches
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       capture_output=True)
        h2load(listen, n, c, client)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       capture_output=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    def annotate(inclusive: bool) -> list[tuple[int, str]]:
        ann = subprocess.run(
            ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", str(out)],
            capture_output=True, text=True, check=True).stdout
        rows = []
        for line in ann.splitlines():
            m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)", line)
            if m and m.group(2):
                rows.append((int(m.group(1).replace(",", "")), m.group(2)))
        return rows

    rows = annotate(inclusive=False)
    total = next((ir for ir, name in rows if "PROGRAM TOTALS" in name), None)
    if total is None:
        sys.exit(f"no instruction total in {out}")
    print(f"{kind:5} upstream: {total / n:,.0f} instructions per proxied GET "
          f"({n} requests, {c} keep-alive connections, clients {client}, 1 worker)")
    if top:
        for title, listing in (("self", rows), ("inclusive", annotate(inclusive=True))):
            print(f"  the {top} costliest functions ({title}), instructions per request:")
            for ir, name in [r for r in listing if "PROGRAM TOTALS" not in r[1]][:top]:
                name = re.sub(r"/root/\.cargo/registry/src/[^/]+/", "", name)
                print(f"  {ir / n:>10,.0f}  {name[:140]}")
    return total // n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", default="http,https",
                   help="comma list of http, https, h2tls (TLS offering h2 and http/1.1)")
    p.add_argument("--client", choices=("h1", "h2c"), default="h1",
                   help="what the clients speak to the proxy: HTTP/1.1 (default) or h2c")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--top", type=int, default=0, help="print the N costliest functions")
    p.add_argument("--prefixed", action="store_true",
                   help="two routes on the listener, told apart by path_prefix (the request "
                        "goes to the longer-matching one)")
    p.add_argument("--binary", default=str(ROOT / "target" / "profiling" / "token-proxy"))
    p.add_argument("--keep", metavar="DIR",
                   help="keep the callgrind output files (callgrind-KIND.out) in DIR")
    args = p.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx", "h2load", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y valgrind nginx-light nghttp2-client openssl")
    binary = Path(args.binary)
    if not binary.exists():
        sys.exit(f"{binary} is missing: cargo build --profile profiling --locked")
    with tempfile.TemporaryDirectory(prefix="tp-callgrind-") as tmp:
        d = Path(args.keep) if args.keep else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        ca = make_ca(d)
        ports = {"http": free_port(), "https": free_port(), "h2tls": free_port()}
        conf = upstream_conf(d, ports["http"], ports["https"], ports["h2tls"])
        nginx = subprocess.Popen(["nginx", "-p", str(d), "-c", str(conf)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            for port in ports.values():
                wait_port(port)
            for kind in args.upstream.split(","):
                measure(kind, d, binary, ports, ca, args.requests, args.connections, args.top,
                        args.client, args.prefixed)
        finally:
            os.killpg(nginx.pid, signal.SIGTERM)
            nginx.wait(timeout=30)


if __name__ == "__main__":
    main()
