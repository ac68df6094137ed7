//! Least-utilized selection at 1,000 endpoints: the pure `select::pick` and the data
//! path's `EndpointSet::pick` (atomic load counters, thread RNG). Goal: under 1 us per
//! pick. Run: `cargo bench -p neutrino-benches --bench select`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use neutrino_proxy::select::endpoints::{Endpoint, EndpointSet, InFlight};
use neutrino_proxy::select::{Candidate, Weights, pick};

const N: usize = 1000;

fn capacity(i: usize) -> [u64; 3] {
    // Capacity classes 1x, 2x, 4x; a GPU on every tenth.
    let class: u64 = [1000, 2000, 4000][i % 3];
    [class, class * (2 << 20), u64::from(i.is_multiple_of(10))]
}

fn bench(c: &mut Criterion) {
    let candidates: Vec<Candidate> = (0..N)
        .map(|i| {
            let cap = capacity(i);
            Candidate::known(cap, [cap[0] * (i as u64 % 7) / 10, cap[1] / 3, 0])
        })
        .collect();
    let weights = Weights::new(candidates.iter().map(|c| c.capacity));
    let mut seed = 1u64;
    let mut rng = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed
    };
    let mut g = c.benchmark_group("select");
    g.bench_function("pure_pick/1000_endpoints/light", |b| {
        b.iter(|| black_box(pick(&weights, &[100, 64 << 20, 0], |i| candidates[i], &mut rng)))
    });
    let caps: Vec<[u64; 3]> = candidates.iter().map(|c| c.capacity).collect();
    let gpu_weights = Weights::subset(&caps, |c| c[2] > 0);
    g.bench_function("pure_pick/1000_endpoints/gpu_among_100", |b| {
        b.iter(|| black_box(pick(&gpu_weights, &[1000, 1 << 30, 1], |i| candidates[i], &mut rng)))
    });

    let set = EndpointSet::new(
        (0..N)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([10, (i >> 8) as u8, i as u8, 1], 8080)),
                capacity: capacity(i),
                ready: true,
                pod: Arc::from("pod"),
                zone: Arc::from("zone"),
                identity: None,
                load: Arc::default(),
                conns: Arc::default(),
            })
            .collect(),
    );
    // Some load in flight, as on a busy proxy.
    let _held: Vec<InFlight> =
        (0..N).step_by(3).map(|i| InFlight::new(Arc::clone(&set.endpoints[i].load), [500, 1 << 30, 0])).collect();
    g.bench_function("endpoint_set_pick/1000_endpoints/light", |b| {
        b.iter(|| black_box(set.pick(&[100, 64 << 20, 0], None)))
    });
    g.bench_function("endpoint_set_pick/1000_endpoints/gpu", |b| {
        b.iter(|| black_box(set.pick(&[1000, 1 << 30, 1], None)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
