"""Statement routing: a sans-I/O classifier (classify.py) that turns SQL text into a verdict."""
