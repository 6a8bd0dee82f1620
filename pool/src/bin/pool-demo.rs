//! pool-demo: opens (or creates) a pool under `--data-dir`, runs one backup cycle on a volume
//! (write, seal, change, seal, instant clone of the first snapshot) and prints what the pool
//! holds. A tour of the pool until `maasd` serves it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use maas_pool::{BlockDevice, CreateOptions, OpenOptions, Pool};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "./maas-data")]
    data_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let dir = a.data_dir.join("pool");
    let pool = if dir.join("pool.json").exists() {
        Pool::open(&dir, OpenOptions::default())?
    } else {
        Pool::create(&dir, CreateOptions::default(), OpenOptions::default())
            .with_context(|| format!("creating a pool in {}", dir.display()))?
    };
    let name = format!("demo-{}", pool.volumes().len() + 1);
    let vi = pool.create_volume(&name, 1 << 30, 4096)?;
    let v = pool.open_volume(vi.id)?;
    let text: Vec<u8> = (0..64u32 << 10)
        .flat_map(|i| format!("line {i:08} of a backup\n").into_bytes())
        .collect();
    let block = &text[..(16 << 20).min(text.len()) / 4096 * 4096];
    v.write(0, block, false)?;
    v.write(256 << 20, block, false)?; // the same data again: stored once
    v.flush()?;
    let s1 = pool.seal(vi.id)?;
    v.write(4096, &vec![0xAB; 4096], true)?;
    let s2 = pool.seal(vi.id)?;
    let clone = pool.clone_snapshot(s1.id, &format!("{name}-restore"))?;
    let mut check = vec![0u8; 4096];
    pool.open_volume(clone.id)?.read(4096, &mut check)?;
    assert_eq!(
        &check[..],
        &block[4096..8192],
        "the clone shows the first snapshot"
    );
    println!("pool {} in {}", pool.pool_id(), dir.display());
    println!(
        "volume {} ({} bytes): snapshots {} and {}, instant clone {}",
        vi.name, vi.size, s1.id, s2.id, clone.name
    );
    let st = pool.stats()?;
    println!("{}", serde_json::to_string_pretty(&st)?);
    println!("verify: {:?}", pool.verify()?.damaged.len());
    pool.close()?;
    Ok(())
}
