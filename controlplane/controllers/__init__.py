"""The controllers: slices, nodes and agent sessions, health, telemetry, migrations, workloads, retention, standby."""
