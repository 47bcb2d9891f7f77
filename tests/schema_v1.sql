-- The store schema of aenode 0.1.0 (schema 1), as aenode/store.py and
-- aenode/select/studies.py created it; kept to test the migration to later schemas.
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_ae TEXT,
    assoc_id TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid, revision);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    study_uid TEXT NOT NULL,
    modality TEXT,
    description TEXT,
    expected INTEGER,
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_arrival REAL NOT NULL,
    last_arrival REAL NOT NULL,
    last_assoc_id TEXT,
    state TEXT NOT NULL DEFAULT 'receiving',
    completed_at REAL,
    completed_by TEXT,
    reason TEXT,
    PRIMARY KEY (series_uid, revision)
);
CREATE INDEX IF NOT EXISTS series_state ON series (state);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS series_assocs (
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    assoc_id TEXT NOT NULL,
    PRIMARY KEY (series_uid, revision, assoc_id)
);
CREATE TABLE IF NOT EXISTS associations (
    assoc_id TEXT PRIMARY KEY,
    calling_ae TEXT,
    peer_host TEXT,
    started_at REAL NOT NULL,
    released_at REAL
);
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'ready',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT,
    UNIQUE (topic, key)
);
CREATE INDEX IF NOT EXISTS queue_ready ON queue (topic, state, not_before);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    inputs TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    reason TEXT,
    result_dir TEXT,
    findings TEXT,
    t_received REAL,
    t_completed REAL,
    t_started REAL,
    t_inferred REAL,
    t_written REAL,
    t_exported REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (rule, model, inputs)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    files TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    first_try_at REAL,
    next_try_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_try_at);
CREATE TABLE IF NOT EXISTS select_roles (
    rule TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    role TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    series TEXT NOT NULL,
    matched_at REAL NOT NULL,
    PRIMARY KEY (rule, study_uid, role)
);
CREATE TABLE IF NOT EXISTS select_studies (
    rule TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'waiting',
    first_match REAL NOT NULL,
    last_match REAL NOT NULL,
    reason TEXT,
    PRIMARY KEY (rule, study_uid)
);
CREATE INDEX IF NOT EXISTS select_studies_state ON select_studies (state, last_match);
