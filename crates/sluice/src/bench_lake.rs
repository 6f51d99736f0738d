//! `sluice bench e2e --destination-type s3`: a fresh bucket on the given
//! S3-compatible server (e.g. moto from `scripts/setup-s3.sh`), the
//! destinations writing under a prefix each, their writes counted from the
//! server's metrics (as for `postgres`), and every object read back at the
//! end: its events (NDJSON lines or Parquet rows) counted and checked
//! against those writes.

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use object_store::ObjectStore;
use sluice_deliver::sink::Sink;

use crate::bench_postgres::LoadCounter;

/// The credentials the server and this reader sign with when the
/// environment has none (an S3-compatible test server takes any).
pub const BENCH_AWS: [(&str, &str); 2] = [("AWS_ACCESS_KEY_ID", "sluice-bench"), ("AWS_SECRET_ACCESS_KEY", "sluice-bench-secret")];

/// The run's bucket and the thread counting writes.
pub struct Lake {
    endpoint: String,
    bucket: String,
    /// `ndjson` or `parquet`.
    format: String,
    counter: Option<LoadCounter>,
}

impl Lake {
    /// Make a bucket on the server at `endpoint` (`http://host:port`; a
    /// server that lets this bench create buckets unsigned, as moto does).
    pub fn create(rt: &tokio::runtime::Runtime, endpoint: &str, format: &str) -> Result<Lake> {
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        let bucket = format!("sluice-bench-{}", std::process::id());
        let status = rt
            .block_on(async { reqwest::Client::new().put(format!("{endpoint}/{bucket}")).send().await })
            .with_context(|| format!("create bucket {bucket} at {endpoint}"))?
            .status();
        if !status.is_success() {
            bail!("create bucket {bucket} at {endpoint}: {status}");
        }
        Ok(Lake { endpoint, bucket, format: format.to_owned(), counter: None })
    }

    /// The config lines of destination `id` (after `id`).
    pub fn destination_keys(&self, id: &str) -> String {
        format!(
            "url = \"s3://{}/{id}\"\ns3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\ns3_format = \"{}\"\n",
            self.bucket, self.endpoint, self.format
        )
    }

    /// The credentials the server needs, unless the environment has them.
    pub fn server_env(&self) -> Vec<(&'static str, &'static str)> {
        BENCH_AWS.iter().copied().filter(|(k, _)| std::env::var_os(k).is_none()).collect()
    }

    pub fn watch(&mut self, admin: &str, token: &str, ids: Vec<String>, sink: &Sink) {
        self.counter = Some(LoadCounter::start(admin, token, ids, sink));
    }

    /// Read every object back: lines and objects, checked against `written`
    /// (jobs the sink counted); a line for the report.
    pub fn verify(&self, rt: &tokio::runtime::Runtime, written: u64) -> Result<String> {
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .with_region("us-east-1");
        for (k, v) in BENCH_AWS {
            let v = std::env::var(k).unwrap_or_else(|_| v.to_owned());
            builder = if k == "AWS_ACCESS_KEY_ID" { builder.with_access_key_id(v) } else { builder.with_secret_access_key(v) };
        }
        let store = builder.build()?;
        let (objects, lines, bytes) = rt.block_on(async {
            let listed: Vec<_> = store.list(None).collect().await;
            let (mut objects, mut lines, mut bytes) = (0u64, 0u64, 0u64);
            for meta in listed {
                let meta = meta?;
                let object = store.get(&meta.location).await?.bytes().await?;
                objects += 1;
                bytes += object.len() as u64;
                lines += if self.format == "parquet" {
                    use parquet::file::reader::FileReader as _;
                    let file = parquet::file::reader::SerializedFileReader::new(object)?;
                    file.metadata().file_metadata().num_rows() as u64
                } else {
                    let mut text = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&object[..]), &mut text)?;
                    text.iter().filter(|&&b| b == b'\n').count() as u64
                };
            }
            anyhow::Ok((objects, lines, bytes))
        })?;
        let check = if lines >= written { "≥ the writes counted" } else { "< the writes counted: CHECK FAILED" };
        Ok(format!("objects in the lake: {objects} ({:.1} MiB {}), {lines} events {check} ({written})", bytes as f64 / 1048576.0, self.format))
    }
}
