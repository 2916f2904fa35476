//! Hot functions of the processor, per core: URL scrubbing and user-agent
//! parsing with and without the cache. `cargo bench -p marsad-privacy`.

#![allow(missing_docs)] // criterion's macros generate undocumented functions

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use marsad_privacy::scrub::{QueryAllowList, scrub_url};
use marsad_privacy::user_agent::{UserAgentCache, parse_user_agent};

const URLS: &[&str] = &[
    "https://kulshi.example/ar/%D8%B3%D9%8A%D8%A7%D8%B1%D8%A7%D8%AA/%D8%AA%D9%88%D9%8A%D9%88%D8%AA%D8%A7?page=2&utm_source=google",
    "https://kulshi.example/en/real-estate/apartments-for-rent/dubai/ad-884213?id=88&sort=price",
    "https://kulshi.example/en/contact/ahmad%40example.com/0791234567?utm_campaign=ramadan",
    "https://kulshi.example/ar/jobs/accountant?session=a8Fq93kLmZ02pQx7Yt41&name=Sara",
];

const AGENTS: &[&str] = &[
    "Mozilla/5.0 (Linux; Android 13; SM-A536B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.0.0 Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
];

fn scrubbing(c: &mut Criterion) {
    let allow = QueryAllowList::new(&["utm_*".into(), "category".into(), "page".into()]);
    let mut group = c.benchmark_group("scrub_url");
    group.throughput(Throughput::Elements(URLS.len() as u64));
    group.bench_function("4 urls", |b| {
        b.iter(|| {
            for u in URLS {
                std::hint::black_box(scrub_url(std::hint::black_box(u), &allow));
            }
        })
    });
    group.finish();
}

fn user_agents(c: &mut Criterion) {
    let mut group = c.benchmark_group("user_agent");
    group.throughput(Throughput::Elements(AGENTS.len() as u64));
    group.bench_function(BenchmarkId::new("parse", "uncached"), |b| {
        b.iter(|| {
            for a in AGENTS {
                std::hint::black_box(parse_user_agent(std::hint::black_box(a)));
            }
        })
    });
    let mut cache = UserAgentCache::default();
    group.bench_function(BenchmarkId::new("parse", "cached"), |b| {
        b.iter(|| {
            for a in AGENTS {
                std::hint::black_box(cache.parse(std::hint::black_box(a)));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, scrubbing, user_agents);
criterion_main!(benches);
