"""r3's tools, apart from the service they measure or feed: `bench` (embedding throughput),
`loadgen`/`loadtest`/`soak` (HTTP load against a running service), `calibrate` (relevance range
of a model), `qtypes` (the query-type store and classifier: load, classify, train, eval) with
`heads` (training the learned head), and `commands` (every console script's entry point)."""
