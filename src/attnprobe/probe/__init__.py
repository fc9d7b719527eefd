"""What is measured: one module per mechanism, and the census that runs them."""
