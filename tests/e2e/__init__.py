"""End-to-end tests: the whole product story through the real commands and real servers."""
