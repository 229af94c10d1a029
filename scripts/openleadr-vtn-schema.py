#!/usr/bin/env python3
"""The OpenADR reference VTN's database schema, ready for Debian 12's PostgreSQL 15.

The VTN (openleadr-vtn) migrates its database when it starts, but one of its migrations uses a
subquery without an alias, which PostgreSQL accepts only from version 16 on. This writes every
migration as one SQL script, that one statement given an alias, and records each migration as
applied with the checksum of its original text, as sqlx does, so that the VTN finds its schema
up to date and leaves it be.

    openleadr-vtn-schema.py MIGRATIONS_DIR > schema.sql
"""
import hashlib
import os
import re
import sys

PG15_FIX = ("FROM (SELECT unnest(_scopes) AS scope)", "FROM (SELECT unnest(_scopes) AS scope) AS scopes")

directory = sys.argv[1]
out = [
    "BEGIN;",
    "CREATE TABLE IF NOT EXISTS _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,"
    " installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, checksum BYTEA NOT NULL,"
    " execution_time BIGINT NOT NULL);",
]
names = sorted(n for n in os.listdir(directory) if n.endswith(".sql"))
if not names:
    sys.exit(f"no migrations in {directory}")
for name in names:
    m = re.match(r"(\d+)_(.*)\.sql$", name)
    if not m:
        sys.exit(f"not a migration's name: {name}")
    text = open(os.path.join(directory, name), "rb").read()
    out.append(text.decode().replace(*PG15_FIX))
    description = m.group(2).replace("_", " ").replace("'", "''")
    out.append(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)"
        f" VALUES ({m.group(1)}, '{description}', true, '\\x{hashlib.sha384(text).hexdigest()}', 0);"
    )
out.append("COMMIT;")
print("\n".join(out))
