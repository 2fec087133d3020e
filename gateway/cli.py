def main():  # placeholder until the CLI lands in this same change
    raise SystemExit("not built yet")
