"""Browser tests of the consent portal: Playwright driving Debian's chromium (marker `browser`)."""
