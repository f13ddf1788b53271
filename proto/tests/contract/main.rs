//! Tests of the agent <-> control-plane contract: the checked-in generated code matches the
//! `.proto` files, the generated client and server talk over a real socket, and messages from
//! a peer of another minor version decode.

mod compat;
mod drift;
mod loopback;
