// The binary target is the eBPF object; this empty library only exists so the
// agent can name this crate as a build-dependency and be rebuilt when it changes.
#![no_std]
