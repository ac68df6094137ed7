//! Route matching on the largest OpenAPI document in the shared test data (Kubernetes
//! core/v1: 248 operations): the cost of one `RouteTable::lookup` per request.
//! Run: `cargo bench -p neutrino-benches --bench route_match`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use neutrino_proxy::route::table::example_path;
use neutrino_proxy::route::{Cost, RouteTable};

fn document() -> Vec<neutrino_proto::Route> {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/testdata/openapi/kubernetes-v1.35-api__v1_openapi.json");
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}; the shared test data sits beside the repo"));
    match neutrino_control_plane::translate::openapi::routes(&bytes) {
        Ok(r) => r.routes,
        Err(e) => panic!("{path}: {e}"),
    }
}

fn bench(c: &mut Criterion) {
    let routes = document();
    let table = RouteTable::compile(&routes, Cost::default());
    let requests: Vec<(Method, String)> = routes
        .iter()
        .map(|r| {
            (
                Method::from_bytes(r.method.as_bytes()).unwrap_or(Method::GET),
                example_path(&r.path_template, "my-object-7"),
            )
        })
        .collect();
    let mut g = c.benchmark_group("route_match");
    g.bench_function("kubernetes_248_ops/lookup_each_operation", |b| {
        let mut i = 0;
        b.iter(|| {
            let (m, p) = &requests[i % requests.len()];
            i += 1;
            black_box(table.lookup(m, black_box(p)));
        })
    });
    g.bench_function("kubernetes_248_ops/miss", |b| {
        b.iter(|| black_box(table.lookup(&Method::GET, black_box("/apis/not/a/real/path/at/all"))))
    });
    g.bench_function("kubernetes_248_ops/compile", |b| {
        b.iter(|| black_box(RouteTable::compile(&routes, Cost::default())))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
