"""When the engines generate relative to training (rollout.mode), and what every trained sample's lineage says.

    off       generate -> score -> train -> sync, one after the other (ppo.py alone)
    one_step  batch k+1 is generated with weights k while batch k scores and trains: pipeline.RolloutPipeline(1)
    bounded   batches k+1 .. k+S are in flight at once (S = rollout.max_staleness), each advanced by one chunk of
              its tokens per iteration and interrupted at every weight sync: pipeline.RolloutPipeline(S)

lineage.py: per trained sample, where it came from and how stale it was; samples.jsonl.
"""
