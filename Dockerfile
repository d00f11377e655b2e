# token-proxy container image.
#
#   docker build -t token-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#     -v "$PWD/container.toml:/etc/token-proxy/config.toml:ro" \
#     -e CN_API_CLIENT_ID -e CN_API_CLIENT_SECRET -e AZURE_TENANT_ID token-proxy
#
# No configuration and no secret is baked in: mount the config at /etc/token-proxy/config.toml
# and pass secrets as environment variables (${VAR} in the config) or mounted files
# (client_secret_file). TLS roots are compiled into the binary, so the image needs no CA bundle.

# ---- build ----
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, against empty sources, so that this layer is reused until Cargo.toml or
# Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. COPY keeps the files' own modification times, which can be older than the
# placeholder build above: touch them so that cargo rebuilds the crate itself.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && ./target/release/token-proxy --version

# ---- run ----
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/release/token-proxy /usr/local/bin/token-proxy
# The image's "nonroot" user, by number: Kubernetes' runAsNonRoot can only verify a numeric user.
USER 65532:65532
# Route and admin ports of the usual config; inside a container, listen on 0.0.0.0.
EXPOSE 8080 9901
# Readiness without a shell: exit 0 when the /readyz of the admin listener that the config
# names (its admin_listen, any port; 0.0.0.0 is probed on loopback) answers 200. With the
# config elsewhere, override it at run time
# (docker run --health-cmd '/usr/local/bin/token-proxy health --config /path/config.toml').
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/token-proxy", "health", "--config", "/etc/token-proxy/config.toml"]
ENTRYPOINT ["/usr/local/bin/token-proxy"]
CMD ["run", "--config", "/etc/token-proxy/config.toml"]
