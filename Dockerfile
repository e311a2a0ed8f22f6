# syntax=docker/dockerfile:1
# The tokentap image: the profile-guided build of bench/pgo.sh on a distroless base, as uid 65532.
#
#   docker build -t tokentap .                  # build context: the repository root
#   docker run --rm -p 8080:8080 tokentap serve --upstream http://vllm:8000
#
# The build stage trains the profile by forwarding simulated vLLM traffic through an
# instrumented tokentap on the build container's loopback, so the build needs two CPUs
# (pgo.sh pins the load and the proxy to CPUs 0 and 1) and takes about ten minutes on two.
# The admin listener (/metrics, /healthz, /readyz) binds 127.0.0.1:9464 unless the
# configuration or TOKENTAP_ADMIN_LISTEN says otherwise; deploy/ sets 0.0.0.0:9464.
# deploy/check.sh checks this file (hadolint, every path it copies and runs) without a Docker
# engine.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
# curl and wrk for the training load of bench/pgo.sh (taskset is in util-linux, already here).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl wrk \
    && rm -rf /var/lib/apt/lists/*
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# bench/pgo.sh merges the profile with llvm-profdata-<LLVM major of rustc>: take it from
# rustup's llvm-tools, which always match the toolchain's LLVM.
RUN rustup component add llvm-tools \
    && llvm="$(rustc -vV | awk '/^LLVM version/ {split($3, v, "."); print v[1]}')" \
    && host="$(rustc -vV | awk '/^host/ {print $2}')" \
    && ln -s "$(rustc --print sysroot)/lib/rustlib/${host}/bin/llvm-profdata" \
        "/usr/local/bin/llvm-profdata-${llvm}" \
    && "llvm-profdata-${llvm}" --version
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo fetch --locked \
    && bash bench/pgo.sh \
    && install -m 0755 target/pgo/release/tokentap /usr/local/bin/tokentap

# glibc, libgcc and CA certificates (for https:// upstreams), no shell, user nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/tokentap /usr/local/bin/tokentap
USER 65532:65532
EXPOSE 8080 9464
ENTRYPOINT ["/usr/local/bin/tokentap"]
CMD ["serve"]
