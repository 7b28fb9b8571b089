"""Code both sites and the server import; importable without Flower."""
