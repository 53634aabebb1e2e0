# Multi-stage build of the agent image. The eBPF object is built by the
# agent's build script (nightly + bpf-linker), so the builder needs both.
# Toolchains pinned: stable 1.95 for the agent, a dated nightly for the eBPF
# crate (-Z build-std), bpf-linker 0.13.0 from its lock file.
FROM rust:1.95.0-bookworm AS build
ARG NIGHTLY=nightly-2026-05-19
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends llvm-22-dev libpolly-22-dev \
 && rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustup run "$NIGHTLY" rustc --print sysroot)" \
 && PATH=/usr/lib/llvm-22/bin:$PATH cargo install --locked bpf-linker --version =0.13.0 --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mcs-agent

# distroless/cc: glibc and libgcc only; the agent needs no shell.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/mcs-agent /usr/local/bin/mcs-agent
ENTRYPOINT ["/usr/local/bin/mcs-agent"]
