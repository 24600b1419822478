"""Cache planning from routing statistics (the ZipMoE co-design): activation model, planner."""
