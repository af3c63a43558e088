"""Benchmarks behind ``brickwork bench``: what they run lives here, their committed results in bench/results."""
