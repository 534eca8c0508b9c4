# syntax=docker/dockerfile:1
# nodetune image for users with a container engine:
#   docker build -t ghcr.io/nodetune/nodetune:0.1.0 --build-arg NODETUNE_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
# scripts/image builds the same runtime stage offline with buildah (no engine, no registry);
# tests/image.rs checks that both declare the same entrypoint, user and labels.

# Build: a statically linked binary (glibc, crt-static), so the runtime needs no libraries.
FROM rust:1.95-bookworm AS build
ARG NODETUNE_GIT_COMMIT=unknown
WORKDIR /src
COPY . .
RUN RUSTFLAGS='-C target-feature=+crt-static' \
    NODETUNE_GIT_COMMIT="${NODETUNE_GIT_COMMIT}" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu --bin nodetune

# Runtime: only the binary. Non-root by default; the agent's pod spec asks for root and
# privileged, by design (it writes /proc/sys).
FROM scratch
COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/nodetune /nodetune
USER 65532:65532
ENTRYPOINT ["/nodetune"]
LABEL org.opencontainers.image.title="nodetune" \
      org.opencontainers.image.description="Declarative sysctl tuning and TCP state reporting for Kubernetes nodes" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
