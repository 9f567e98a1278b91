//! Persistence of `datapipeline-local` with `--state DIR`: one SQLite row per pipeline, its whole
//! state as JSON, written after every change (WAL, so a crash loses at most the last change).

use super::engine::Pipeline;
use anyhow::Context;
use rusqlite::{params, Connection};
use std::path::Path;

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
        let path = dir.join("datapipeline-local.sqlite3");
        let conn = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS pipelines (id TEXT PRIMARY KEY, body TEXT NOT NULL);",
        )
        .with_context(|| format!("initialising {}", path.display()))?;
        Ok(Store { conn })
    }

    pub fn load(&self) -> anyhow::Result<Vec<Pipeline>> {
        let mut stmt = self.conn.prepare("SELECT id, body FROM pipelines")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row?;
            out.push(
                serde_json::from_str(&body).with_context(|| format!("state of pipeline {id} is corrupt"))?,
            );
        }
        Ok(out)
    }

    pub fn save(&self, p: &Pipeline) -> anyhow::Result<()> {
        let body = serde_json::to_string(p)?;
        self.conn.execute(
            "INSERT INTO pipelines (id, body) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            params![p.id, body],
        )?;
        Ok(())
    }
}
