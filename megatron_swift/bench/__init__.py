"""Compare fine-tuning techniques on the user's own job: `python -m megatron_swift.bench techniques`.

techniques.py: the named override sets and the checked run list; runner.py: one real training job per
technique (subprocess) and its row from the job's own logs; report.py: JSON, Markdown and PNG.
"""
