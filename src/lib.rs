//! stepmesh: a service-mesh sidecar that terminates and originates mTLS with
//! SPIFFE X.509-SVIDs, authorizes by workload identity and demands step-up
//! JWTs on sensitive HTTP routes. See ARCHITECTURE.md for the map.

pub mod accesslog;
pub mod admin;
pub mod alloc;
pub mod app;
pub mod appprobe;
pub mod ca_admin;
pub mod ca_cmd;
pub mod cert_cmd;
pub mod cidr;
pub mod cli;
pub mod demo;
pub mod drain;
pub mod exit;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod init;
pub mod inject;
pub mod login;
pub mod metrics;
pub mod net;
pub mod netsync;
pub mod policy;
pub mod policy_cmd;
pub mod proxy;
pub mod stepup;
pub mod telemetry;
pub mod tls;
pub mod units;
pub mod workload;

/// Entry points for the fuzz targets in `fuzz/` (see docs/FUZZING.md): the
/// HTTP/1 head and body parsers, which are otherwise internal to the relay,
/// and the HTTP/2 frame tracker of the header deadline. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::detect::H2_PREFACE;
    pub use crate::http::h1::body::{BodyError, Remaining};
    pub use crate::http::h1::message::{
        parse_request, parse_response, splice_request, write_request, write_response, Detail,
        Framing, HeadError, HeadLimits, RequestHead, ResponseHead,
    };
    pub use crate::http::h2_frames::{FrameTracker, Open};
}
