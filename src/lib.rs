//! The native module `ferroloop._ferroloop`: the module list only.

use pyo3::prelude::*;

mod errors;
mod event_loop;
mod fastcall;
mod handles;
mod py;
mod reactor;
mod sockets;
mod timers;
mod transports;

#[pymodule]
fn _ferroloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<event_loop::EventLoop>()?;
    m.add_class::<handles::Handle>()?;
    m.add_class::<handles::TimerHandle>()?;
    m.add_function(wrap_pyfunction!(sockets::recv, m)?)?;
    m.add_class::<transports::stream::StreamCore>()?;
    // Datagram and pipe transports (udp.rs, pipe.rs).
    m.add_class::<transports::udp::DatagramCore>()?;
    m.add_class::<transports::pipe::ReadPipeCore>()?;
    m.add_class::<transports::pipe::WritePipeCore>()?;
    fastcall::install(m.py())?;
    Ok(())
}
