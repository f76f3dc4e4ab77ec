from cispo_jax.analysis.report import main

if __name__ == "__main__":
  main()
