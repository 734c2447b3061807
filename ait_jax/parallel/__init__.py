"""Device mesh, logical-axis rules, shardings and multi-host initialisation."""
