"""What the router measures beyond Prometheus' scrape-time state: query statistics per tenant
and fingerprint, the slow-query log (queries.py), and cheap histograms and counters fed from
the hot path (histogram.py)."""
