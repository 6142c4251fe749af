//! The gateway's own metrics (connections, requests), beside those of the
//! `prometheus` plugin, in the process's one registry
//! ([`turnpike_plugin::metrics`]).

use std::sync::OnceLock;

use turnpike_plugin::metrics::{register, IntCounter, IntGauge, IntGaugeVec, Opts};

pub(crate) struct Gateway {
    /// `apisix_nginx_http_current_connections` by `state`: `active` (open
    /// now), `accepted` and `handled` (since start), looked up once.
    active: IntGauge,
    accepted: IntGauge,
    handled: IntGauge,
    /// Every request received, routed or not.
    pub requests: IntCounter,
    /// The configuration revision being served.
    pub revision: IntGauge,
    /// Health of the nodes of upstreams with checks (set at scrape time).
    pub upstream_status: IntGaugeVec,
}

pub(crate) fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        // Names and label sets are constants, checked by the tests.
        let connections = IntGaugeVec::new(
            Opts::new(
                "apisix_nginx_http_current_connections",
                "Client connections by state: active now; accepted and handled since start",
            ),
            &["state"],
        )
        .expect("valid metric");
        let requests = IntCounter::new("apisix_http_requests_total", "Requests received")
            .expect("valid metric");
        let revision = IntGauge::new(
            "turnpike_config_revision",
            "Revision of the configuration being served",
        )
        .expect("valid metric");
        let node = IntGaugeVec::new(
            Opts::new("apisix_node_info", "This gateway node"),
            &["hostname", "version"],
        )
        .expect("valid metric");
        node.with_label_values(&[
            turnpike_plugin::metrics::hostname(),
            env!("CARGO_PKG_VERSION"),
        ])
        .set(1);
        register(node);
        let upstream_status = IntGaugeVec::new(
            Opts::new(
                "apisix_upstream_status",
                "Upstream node health by health checks: 1 healthy, 0 unhealthy",
            ),
            &["name", "ip", "port"],
        )
        .expect("valid metric");
        let connections = register(connections);
        let state = |s: &str| connections.with_label_values(&[s]);
        Gateway {
            upstream_status: register(upstream_status),
            active: state("active"),
            accepted: state("accepted"),
            handled: state("handled"),
            requests: register(requests),
            revision: register(revision),
        }
    })
}

impl Gateway {
    /// A client connection was accepted; the guard counts it out of
    /// `active` when dropped.
    pub(crate) fn connection(&'static self) -> ConnectionGuard {
        // As nginx: `handled` is every accepted connection not dropped at
        // once for lack of resources, which Turnpike never does.
        self.accepted.inc();
        self.handled.inc();
        self.active.inc();
        ConnectionGuard(self)
    }
}

pub(crate) struct ConnectionGuard(&'static Gateway);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active.dec();
    }
}
