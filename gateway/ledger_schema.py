"""The ledger's SQLite schema and the migrations of files an older gateway created.

Owns the DDL of ``accounts``, ``transfers``, ``escrows`` and ``escrow_usage`` (and the two
reserved accounts), plus the columns added since the first release. Kept apart from
``gateway.ledger`` so the shape of the books is read in one place, without the code that moves
money; ``Ledger.__init__`` runs these scripts, in order, on every open (each is idempotent).
"""

SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('user','mint','fees','escrow')),
    balance INTEGER NOT NULL DEFAULT 0,  -- cache of the rows, updated in the same transaction
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transfers (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL,  -- rows are never deleted, so ids only grow
    debit TEXT NOT NULL REFERENCES accounts(name), credit TEXT NOT NULL REFERENCES accounts(name),
    amount INTEGER NOT NULL CHECK (amount > 0), reason TEXT NOT NULL, task_id TEXT);
CREATE INDEX IF NOT EXISTS transfers_debit ON transfers(debit);
CREATE INDEX IF NOT EXISTS transfers_credit ON transfers(credit);
CREATE TABLE IF NOT EXISTS escrows (
    task_id TEXT PRIMARY KEY, client TEXT NOT NULL REFERENCES accounts(name),
    held INTEGER NOT NULL, charged INTEGER NOT NULL DEFAULT 0, fee INTEGER NOT NULL DEFAULT 0,
    refunded INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, created REAL NOT NULL, closed REAL);
CREATE INDEX IF NOT EXISTS escrows_open ON escrows(state) WHERE state = 'held';
CREATE INDEX IF NOT EXISTS escrows_client_open ON escrows(client) WHERE state = 'held';
CREATE TABLE IF NOT EXISTS escrow_usage (  -- per (task, provider): each is paid its own usage
    task_id TEXT NOT NULL REFERENCES escrows(task_id), provider TEXT NOT NULL,
    reported INTEGER NOT NULL, charged INTEGER NOT NULL, fee INTEGER NOT NULL,
    PRIMARY KEY (task_id, provider));
INSERT OR IGNORE INTO accounts(name, kind, created) VALUES ('mint', 'mint', 0), ('fees', 'fees', 0);
COMMIT;
"""

#: Columns added after the first release, for files an older gateway created: ``task`` is the
#: escrow id before its ``~`` (the task, whatever its submission; indexed for the lookup of an
#: earlier final settlement), ``final`` is 1 once a settlement closed it as the task's outcome (a
#: result was delivered), not a refund or a restart's recovery.
MIGRATIONS = (
    ("task", "ALTER TABLE escrows ADD COLUMN task TEXT"),
    ("final", "ALTER TABLE escrows ADD COLUMN final INTEGER NOT NULL DEFAULT 0"),
)
MIGRATED = """
BEGIN IMMEDIATE;
UPDATE escrows SET task = CASE WHEN instr(task_id, '~') THEN
    substr(task_id, 1, instr(task_id, '~') - 1) ELSE task_id END WHERE task IS NULL;
CREATE INDEX IF NOT EXISTS escrows_task ON escrows(task);
COMMIT;
"""
