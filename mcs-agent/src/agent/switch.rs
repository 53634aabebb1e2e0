//! The order in which a starting agent takes the datapath over from the one
//! before it, across a layout change or not. The steps are the kernel's;
//! their order is the decision, and is what keeps every flow alive.

/// The steps, as the datapath performs them. `layout` indexes the older
/// layouts being taken over from (none on a restart within one layout).
pub trait Switch {
    type Error;
    /// Copies an older layout's flows, affinity and socket translations
    /// into this layout's maps.
    fn carry_over(&mut self, layout: usize);
    /// While on, a packet the new programs do not know is left to the older
    /// programs behind them (it may be a flow they made).
    fn set_handoff(&mut self, on: bool) -> Result<(), Self::Error>;
    /// Attaches this agent's programs to every interface and the socket
    /// programs to their cgroup, replacing the older ones.
    fn take_over(&mut self) -> Result<(), Self::Error>;
    /// Removes an older layout's pins and maps.
    fn retire(&mut self, layout: usize);
}

/// Takes over from `older` layouts once the maps hold the desired state:
/// their flows first, so the new programs know every connection when they
/// take over; programs swapped in only then (with handoff on, the older
/// programs stay behind ours for the flows they created until the switch);
/// then handoff off before the last copy: from the flip on the older
/// programs create no flows, so that copy holds every flow they made
/// (copying first left a window in which a flow they created was in neither
/// the copy nor, once they were retired, anywhere: a lost UDP reply); the
/// older layouts go last.
pub fn switch_over<S: Switch>(switch: &mut S, older: usize) -> Result<(), S::Error> {
    for layout in 0..older {
        switch.carry_over(layout);
    }
    switch.set_handoff(older > 0)?;
    switch.take_over()?;
    if older > 0 {
        switch.set_handoff(false)?;
        for layout in 0..older {
            switch.carry_over(layout);
        }
        for layout in 0..older {
            switch.retire(layout);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        steps: Vec<String>,
        fail_take_over: bool,
    }

    impl Switch for Recorder {
        type Error = String;
        fn carry_over(&mut self, layout: usize) {
            self.steps.push(format!("carry {layout}"));
        }
        fn set_handoff(&mut self, on: bool) -> Result<(), String> {
            self.steps.push(format!("handoff {}", if on { "on" } else { "off" }));
            Ok(())
        }
        fn take_over(&mut self) -> Result<(), String> {
            self.steps.push("take over".into());
            if self.fail_take_over { Err("attach failed".into()) } else { Ok(()) }
        }
        fn retire(&mut self, layout: usize) {
            self.steps.push(format!("retire {layout}"));
        }
    }

    #[test]
    fn across_layouts_flows_first_then_programs_then_handoff_off_the_last_copy_and_retirement() {
        let mut r = Recorder::default();
        switch_over(&mut r, 2).unwrap();
        assert_eq!(
            r.steps,
            [
                "carry 0",
                "carry 1",
                "handoff on",
                "take over",
                "handoff off",
                "carry 0",
                "carry 1",
                "retire 0",
                "retire 1"
            ]
        );
    }

    #[test]
    fn within_one_layout_only_the_programs_are_swapped() {
        let mut r = Recorder::default();
        switch_over(&mut r, 0).unwrap();
        assert_eq!(r.steps, ["handoff off", "take over"]);
    }

    #[test]
    fn a_failed_take_over_retires_nothing() {
        let mut r = Recorder { fail_take_over: true, ..Recorder::default() };
        assert_eq!(switch_over(&mut r, 1), Err("attach failed".into()));
        assert_eq!(r.steps, ["carry 0", "handoff on", "take over"], "the older layout keeps serving");
    }
}
