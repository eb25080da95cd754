"""Generation evaluation: greedy answers to held-out questions, scored.

  scoring.py     pure scoring: normalised exact match, multiple choice by letter, breakdowns
  decode.py      greedy KV-cached decoding, batched with left padding, in lockstep across ranks
  questions.py   shard records -> prompts exactly as in training + reference answers
  answer.py      batches of prompts -> answers -> scored rows (shared by all callers)
  checkpoint.py  `llava-train eval CHECKPOINT --data SHARDS`
  in_loop.py     `train.eval_generate_every`: the same scoring on the training model
  lmms_eval_model.py  the `llava_train` model for lmms-eval (optional extra `[eval]`)
"""
