"""Prefect tasks of the restore-archive pipeline, one module per stage; each works on a shard or a wave.

Every module also exposes its stage as a plain function (`discover_images`, `detect_shard`,
`estimate_shard`, `bucket_wave`, `sample_wave_rows`, `compose_shard`, `score_shard`,
`commit_shard_rows`), usable without Prefect.
"""
