"""What a person reads: one scenario's terminal report, result.json and HTML section
(scenario_report), its per-step figure (figures), and mode=report's handout (handout).
"""
