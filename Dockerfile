# syntax=docker/dockerfile:1

# ---- builder -------------------------------------------------------------------------------
# The slim Rust image already has gcc and libc6-dev, which is all the native code needs:
# SQLite is built from source (sqlx's bundled libsqlite3-sys) and TLS is rustls, whose ring and
# aws-lc-sys crypto build with the C compiler alone (aws-lc-sys needs no cmake on
# x86_64/aarch64 Linux). No OpenSSL, no pkg-config.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src

# Dependencies first: the workspace manifests, the lock file and dummy targets, so this layer
# (the long part of the build) is reused until Cargo.toml or Cargo.lock change. Cargo.toml
# declares the `gateway` bench target, and the manifest does not load without its file.
COPY Cargo.toml Cargo.lock ./
COPY adapters/Cargo.toml adapters/Cargo.toml
COPY mappings/Cargo.toml mappings/Cargo.toml
RUN mkdir -p src benches adapters/src mappings/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs adapters/src/lib.rs mappings/src/lib.rs \
    && echo 'fn main() {}' > benches/gateway.rs \
    && cargo build --release --locked --bin fhirgate \
    && rm -rf src benches adapters/src mappings/src

# The real sources. config/default.toml and migrations/ are compiled into the binary
# (include_str!); config/codes and config/payers are read at run time (copied below).
COPY src src
COPY adapters adapters
COPY mappings mappings
COPY migrations migrations
COPY config config
COPY benches benches
# COPY keeps the files' original mtimes, which can be older than the dummy build: touch the
# crate roots so cargo rebuilds the three workspace crates instead of reusing the dummies.
RUN touch src/main.rs src/lib.rs adapters/src/lib.rs mappings/src/lib.rs \
    && cargo build --release --locked --bin fhirgate \
    && install -m 0755 target/release/fhirgate /usr/local/bin/fhirgate

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user owning the data directory. The directory is created and chowned before
# VOLUME, so a new named volume starts with this ownership.
RUN groupadd --system --gid 10001 fhirgate \
    && useradd --system --uid 10001 --gid fhirgate --no-create-home \
        --home-dir /var/lib/fhirgate --shell /usr/sbin/nologin fhirgate \
    && mkdir -p /var/lib/fhirgate \
    && chown fhirgate:fhirgate /var/lib/fhirgate

COPY --from=builder /usr/local/bin/fhirgate /usr/local/bin/fhirgate
# Claim preparation's code tables and payer rules are read at start (claims.rules_dir): a payer
# is added by mounting another folder there (or a file into payers/) and restarting.
COPY config/codes /etc/fhirgate/codes
COPY config/payers /etc/fhirgate/payers

USER 10001:10001
WORKDIR /var/lib/fhirgate
ENV FHIRGATE_LISTEN=0.0.0.0:8080 \
    FHIRGATE_DATABASE_URL=sqlite:///var/lib/fhirgate/fhirgate.db \
    FHIRGATE_CLAIMS__RULES_DIR=/etc/fhirgate
EXPOSE 8080
VOLUME /var/lib/fhirgate

# `fhirgate healthcheck` is a tiny built-in HTTP probe, so the image needs no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["fhirgate", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]

ENTRYPOINT ["fhirgate"]
CMD ["serve"]
