"""Studies: pytest-benchmark suites, workload generators and the report
generator (``quiver report``).  ``studies`` may import every other package;
nothing imports ``studies``."""
