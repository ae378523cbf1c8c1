"""Catalogs as users have them: photometry tables with one column specification, row and band
flags, chunked readers for large files, and mock catalogs with known truths."""
